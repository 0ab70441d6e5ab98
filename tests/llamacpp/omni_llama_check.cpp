// omni-llama-check: loads a Thinker GGUF (and optionally an mmproj GGUF) in llama.cpp and prints,
// as one JSON object on stdout, what our engine is compared with:
//   - the token ids llama.cpp's tokenizer gives for --text (parse_special = true, no BOS added),
//   - the greedy continuation (argmax, stopping at an end-of-generation token) of --prompt-ids,
//   - with --force-ids, the argmax at each step of a given continuation fed back instead (teacher
//     forcing: prediction i is made after the prompt and the first i forced tokens),
//   - whether the mmproj file loads (mtmd_init_from_file, including its warm-up encode) and which
//     modalities it supports.
//
//   omni-llama-check --model thinker.gguf [--mmproj mmproj.gguf] [--text TEXT]
//                    [--prompt-ids 1,2,3 [--force-ids 4,5,6]] [--n 40] [--threads 2] [--kv-f16]
//
// Built by tests/llamacpp/build.sh against libllama/libmtmd of the llama-cpp-python sdist.

#include "llama.h"
#include "mtmd.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

static void json_string(const std::string & s) {
    std::putchar('"');
    for (unsigned char c : s) {
        if (c == '"' || c == '\\') { std::printf("\\%c", c); }
        else if (c < 0x20) { std::printf("\\u%04x", c); }
        else { std::putchar(c); }
    }
    std::putchar('"');
}

static void json_ids(const std::vector<llama_token> & ids) {
    std::putchar('[');
    for (size_t i = 0; i < ids.size(); i++) { std::printf(i ? ",%d" : "%d", ids[i]); }
    std::putchar(']');
}

static std::vector<llama_token> parse_ids(const std::string & s) {
    std::vector<llama_token> ids;
    for (const char * p = s.c_str(); *p;) {
        char * end;
        ids.push_back((llama_token) std::strtol(p, &end, 10));
        if (end == p) break;
        p = *end == ',' ? end + 1 : end;
    }
    return ids;
}

static void quiet_log(enum ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_WARN) { std::fputs(text, stderr); }
}

int main(int argc, char ** argv) {
    std::string model_path, mmproj_path, text, prompt_ids, force_ids;
    int n_predict = 40, threads = 2;
    bool kv_f16 = false;
    for (int i = 1; i < argc; i++) {
        std::string a = argv[i];
        auto next = [&]() -> std::string {
            if (i + 1 >= argc) { std::fprintf(stderr, "%s needs a value\n", a.c_str()); std::exit(2); }
            return argv[++i];
        };
        if (a == "--model") model_path = next();
        else if (a == "--mmproj") mmproj_path = next();
        else if (a == "--text") text = next();
        else if (a == "--prompt-ids") prompt_ids = next();
        else if (a == "--force-ids") force_ids = next();
        else if (a == "--n") n_predict = std::atoi(next().c_str());
        else if (a == "--threads") threads = std::atoi(next().c_str());
        else if (a == "--kv-f16") kv_f16 = true;
        else { std::fprintf(stderr, "unknown argument %s\n", a.c_str()); return 2; }
    }
    if (model_path.empty()) { std::fprintf(stderr, "--model is required\n"); return 2; }

    llama_log_set(quiet_log, nullptr);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    llama_model * model = llama_model_load_from_file(model_path.c_str(), mp);
    if (!model) {
        std::printf("{\"model_loaded\":false}\n");
        return 1;
    }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    char desc[256];
    llama_model_desc(model, desc, sizeof desc);

    std::printf("{\"model_loaded\":true,\"desc\":");
    json_string(desc);
    std::printf(",\"n_vocab\":%d,\"n_layer\":%d,\"n_embd\":%d", llama_vocab_n_tokens(vocab), llama_model_n_layer(model), llama_model_n_embd(model));

    if (!text.empty()) {
        std::vector<llama_token> toks(text.size() + 16);
        int n = llama_tokenize(vocab, text.c_str(), (int) text.size(), toks.data(), (int) toks.size(), false, true);
        if (n < 0) { toks.resize(-n); n = llama_tokenize(vocab, text.c_str(), (int) text.size(), toks.data(), (int) toks.size(), false, true); }
        toks.resize(n > 0 ? n : 0);
        std::printf(",\"text_ids\":");
        json_ids(toks);
    }

    if (!prompt_ids.empty()) {
        std::vector<llama_token> prompt = parse_ids(prompt_ids);
        const std::vector<llama_token> forced = parse_ids(force_ids);
        if (!forced.empty()) n_predict = (int) forced.size();
        llama_context_params cp = llama_context_default_params();
        cp.n_ctx = 1024;
        cp.n_batch = 1024;
        cp.n_threads = threads;
        cp.n_threads_batch = threads;
        // An f32 KV cache and no flash attention, as our engine computes attention (llama.cpp's
        // defaults, f16 K/V, with --kv-f16).
        if (!kv_f16) {
            cp.type_k = GGML_TYPE_F32;
            cp.type_v = GGML_TYPE_F32;
            cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
        }
        llama_context * ctx = llama_init_from_model(model, cp);
        std::vector<llama_token> out;
        std::vector<float> first_logits;
        // llama.cpp ends generation at more tokens than the checkpoint's eos ids (its vocab also marks
        // Qwen's <|fim_pad|>, <|repo_name|>, <|file_sep|> as end-of-generation); say which one stopped it.
        llama_token stop_id = -1;
        llama_batch batch = llama_batch_get_one(prompt.data(), (int32_t) prompt.size());
        llama_token tok = 0;
        const int n_vocab = llama_vocab_n_tokens(vocab);
        for (int i = 0; i < n_predict; i++) {
            if (llama_decode(ctx, batch) != 0) { std::fprintf(stderr, "llama_decode failed\n"); break; }
            const float * logits = llama_get_logits_ith(ctx, -1);
            if (first_logits.empty()) first_logits.assign(logits, logits + n_vocab);
            int best = 0;
            for (int v = 1; v < n_vocab; v++) if (logits[v] > logits[best]) best = v;
            tok = best;
            if (!forced.empty()) {
                out.push_back(tok);
                tok = forced[i];
            } else {
                if (llama_vocab_is_eog(vocab, tok)) { stop_id = tok; break; }
                out.push_back(tok);
            }
            batch = llama_batch_get_one(&tok, 1);
        }
        std::printf(",\"prompt_ids\":");
        json_ids(prompt);
        std::printf(forced.empty() ? ",\"greedy_ids\":" : ",\"forced_argmax\":");
        json_ids(out);
        std::printf(",\"stop_id\":%d", stop_id);
        std::printf(",\"first_logits\":[");
        for (size_t v = 0; v < first_logits.size(); v++) std::printf(v ? ",%.6g" : "%.6g", first_logits[v]);
        std::printf("]");
        llama_free(ctx);
    }

    if (!mmproj_path.empty()) {
        mtmd_context_params p = mtmd_context_params_default();
        p.use_gpu = false;
        p.n_threads = threads;
        p.print_timings = false;
        mtmd_context * m = mtmd_init_from_file(mmproj_path.c_str(), model, p);
        std::printf(",\"mmproj_loaded\":%s", m ? "true" : "false");
        if (m) {
            std::printf(",\"vision\":%s,\"audio\":%s,\"audio_sample_rate\":%d", mtmd_support_vision(m) ? "true" : "false",
                        mtmd_support_audio(m) ? "true" : "false", mtmd_get_audio_sample_rate(m));
            mtmd_free(m);
        }
    }
    std::printf("}\n");
    llama_model_free(model);
    llama_backend_free();
    return 0;
}

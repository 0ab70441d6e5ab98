//! Logit-level cross-check with llama.cpp itself on any Thinker GGUF (ours, llama.cpp's converter's,
//! llama-quantize's K-quants). Not in CI: ignored unless run explicitly with the checker built by
//! `tests/llamacpp/build.sh`:
//!
//! ```sh
//! OMNI_LLAMA_CHECK=target/llamacpp/omni-llama-check OMNI_GGUF_THINKERS=a.gguf,b.gguf \
//!     cargo test -p omni-engine --release --test gguf_llamacpp -- --ignored --nocapture
//! ```
//!
//! For each file: the last-prompt-position logits of our engine and of llama.cpp (f32 KV cache) on the
//! same prompt ids: NMSE, argmax, and the greedy continuation of both.

use omni_engine::chat::user_turn;
use omni_engine::generation::{generate_text, Sampler, SamplingParams, StopRule};
use omni_engine::gguf::model::GgufModelFiles;
use omni_engine::pipeline::{NoProgress, OmniModel};
use omni_engine::thinker::argmax;
use omni_engine::thinker::rope::text_positions;

#[test]
#[ignore]
fn logits_and_tokens_match_llama_cpp() {
    let tool =
        std::env::var("OMNI_LLAMA_CHECK").expect("OMNI_LLAMA_CHECK: path to omni-llama-check");
    let files = std::env::var("OMNI_GGUF_THINKERS")
        .expect("OMNI_GGUF_THINKERS: comma-separated Thinker GGUF files");
    let n: usize = std::env::var("OMNI_GGUF_TOKENS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let prompt = std::env::var("OMNI_GGUF_PROMPT")
        .unwrap_or_else(|_| "Tell me a joke about computers.".into());
    for file in files.split(',') {
        let paths =
            GgufModelFiles::with_overrides(None, Some(std::path::Path::new(file)), None, None)
                .unwrap();
        let model = OmniModel::load_gguf(&paths, &mut NoProgress).unwrap();
        let (_, ids) = model
            .render_prompt(&[user_turn(&[], &[], &[], Some(&prompt))])
            .unwrap();
        let mut cache = model.thinker.new_cache();
        let step = model
            .thinker
            .forward(
                &model.thinker.embed(&ids).unwrap(),
                &text_positions(0, ids.len()),
                &mut cache,
                &[],
            )
            .unwrap();
        let ours = model.thinker.last_logits(&step.hidden).unwrap();
        let stop = StopRule {
            eos_ids: model.eos_ids().unwrap(),
            max_new_tokens: n,
        };
        let greedy = generate_text(
            &model.thinker,
            &ids,
            &mut Sampler::new(SamplingParams::greedy()),
            &stop,
            |_| Ok(true),
        )
        .unwrap()
        .token_ids;

        let id_list: Vec<String> = ids.iter().map(u32::to_string).collect();
        let out = std::process::Command::new(&tool)
            .args([
                "--model",
                file,
                "--prompt-ids",
                &id_list.join(","),
                "--n",
                &n.to_string(),
            ])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .expect("no JSON from the checker");
        let json: serde_json::Value = serde_json::from_str(line).unwrap();
        let theirs: Vec<f32> = json["first_logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let their_greedy: Vec<u32> = json["greedy_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let num: f64 = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum();
        let den: f64 = theirs.iter().map(|b| (*b as f64).powi(2)).sum();
        let mut sorted = theirs.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let same_prefix = greedy
            .iter()
            .zip(&their_greedy)
            .take_while(|(a, b)| a == b)
            .count();
        eprintln!(
            "{file} ({}): first-step logits NMSE vs llama.cpp {:.3e}, argmax ours {} / llama.cpp {} (llama.cpp margin {:.4}); greedy equal for {same_prefix}/{} tokens\n  ours  {greedy:?}\n  llama {their_greedy:?}",
            json["desc"].as_str().unwrap_or("?"),
            num / den,
            argmax(&ours),
            argmax(&theirs),
            sorted[0] - sorted[1],
            greedy.len().min(their_greedy.len()),
        );
        assert_eq!(ours.len(), theirs.len());
        assert!(
            num / den < 1e-2,
            "{file}: logits NMSE vs llama.cpp {:.3e}",
            num / den
        );
        assert_eq!(
            argmax(&ours),
            argmax(&theirs),
            "{file}: first greedy token differs from llama.cpp's"
        );
    }
}

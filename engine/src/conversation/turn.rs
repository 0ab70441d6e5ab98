//! One answer on the worker thread: new tokens into the KV cache, the Thinker's decode loop, the
//! Talker + Code2Wav on a second (scoped) thread, then the history update.
//!
//! KV reuse: every turn renders the whole message list with the chat template (as a fresh run would),
//! and only the ids after the longest common prefix with the cached ids are prefilled. The cached ids
//! end with the forwarded answer tokens, so the previous answer is reused whenever the template renders
//! it back to the same tokens (`<|im_end|>\n` and the new user turn are then all that is new). When it
//! does not (a think block the template strips, text that re-tokenises differently, an answer cut
//! after a barge-in), the cache goes back to the end of the previous prompt — a copy of the cache kept
//! from the prefill until the answer is settled — and the answer is prefilled as rendered. A prefix that
//! diverges even earlier rebuilds the cache from the first token (encoder outputs of every clip are
//! kept for that). Either way the Thinker sees exactly the ids of a fresh run on the message list.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use crossbeam_channel::Sender;

use super::{user_message, AnswerEvent, ConversationOptions, TurnInput, TurnSummary, TurnTimings};
use crate::audio_encoder::{expand_audio_pads, scatter_audio, AudioTokens, ClipFeatures};
use crate::chat::{ChatMessage, ContentItem};
use crate::generation::{FinishReason, Sampler, PREFILL_CHUNK};
use crate::pipeline::OmniModel;
use crate::speech::SpeechModels;
use crate::talker::Talker;
use crate::stream::{
    accepted_rows, accepted_state, assistant_start, run_speech, user_rows, CancelToken, SpeechOutput, SpeechSetup,
    TextFeed,
};
use crate::thinker::rope::text_positions;
use crate::thinker::KvCache;
use crate::tokenizer::TextStreamer;

/// Chat history and Thinker state between turns.
pub struct History {
    messages: Vec<ChatMessage>,
    /// Ids whose keys and values are in `cache` (prompts and forwarded answer tokens so far).
    ids: Vec<u32>,
    cache: KvCache,
    /// Audio tokens of every clip so far, in order, and the encoder output of each `[n, hidden]`.
    clip_tokens: Vec<usize>,
    clip_embeds: Vec<Tensor>,
    /// Talker user rows `(position, [1, talker_hidden])` of the cached prompt positions.
    user_rows: Vec<(usize, Tensor)>,
    /// The length of the cache at the end of the last prompt, while the answer may still change
    /// (the cache only grows, so truncating to it restores it; a copy cost ~10 ms per turn).
    snapshot: Option<usize>,
    /// The last answer's generated ids (for `truncate_last_answer`).
    last_answer: Option<Vec<u32>>,
}

impl History {
    pub fn new(model: &OmniModel, system: Option<&str>) -> Self {
        let mut messages = Vec::new();
        if let Some(s) = system {
            messages.push(ChatMessage::text("system", s));
        }
        Self {
            messages,
            ids: Vec::new(),
            cache: model.thinker.new_cache(),
            clip_tokens: Vec::new(),
            clip_embeds: Vec::new(),
            user_rows: Vec::new(),
            snapshot: None,
            last_answer: None,
        }
    }

    pub fn messages(&self) -> &[ChatMessage] {
        &self.messages
    }

    pub fn cached_tokens(&self) -> usize {
        self.ids.len()
    }

    pub fn cached_ids(&self) -> &[u32] {
        &self.ids
    }

    /// Forgets the KV cache (the next turn prefills everything).
    fn drop_cache(&mut self, model: &OmniModel) {
        self.ids.clear();
        self.cache = model.thinker.new_cache();
        self.user_rows.clear();
        self.snapshot = None;
    }

    /// Goes back to the cache at the end of the last prompt, if it was kept.
    fn restore_snapshot(&mut self) -> bool {
        match self.snapshot.take() {
            Some(len) if self.cache.len() >= len && self.cache.truncate(len).is_ok() => {
                self.ids.truncate(len);
                self.user_rows.retain(|(p, _)| *p < len);
                true
            }
            _ => false,
        }
    }

    pub fn truncate_last_answer(&mut self, model: &OmniModel, keep: usize) -> Result<()> {
        let tokens = self.last_answer.clone().context("there is no answer to truncate")?;
        let last =
            self.messages.last_mut().filter(|m| m.role == "assistant").context("the last message is not an answer")?;
        let text = model.tokenizer.decode(&tokens[..keep.min(tokens.len())], true)?;
        *last = ChatMessage::text("assistant", &text);
        // The cached answer tokens no longer match: back to the prompt's end (or, without the copy,
        // the next turn finds the divergence and rebuilds).
        self.restore_snapshot();
        Ok(())
    }

    /// Ids of the whole message list as a fresh run tokenises it, audio placeholders expanded.
    fn render(&self, model: &OmniModel, add_generation_prompt: bool) -> Result<Vec<u32>> {
        let text = model.template.render(&self.messages, add_generation_prompt)?;
        let ids = model.tokenizer.encode(&text)?;
        if self.clip_tokens.is_empty() {
            return Ok(ids);
        }
        let front = model.audio.as_ref().context("the model has no audio encoder")?;
        expand_audio_pads(&ids, front.audio_pad, &self.clip_tokens)
    }

    /// Input embeddings `[1, n - from, hidden]` of `ids[from..]`, encoder outputs at the audio pads.
    fn embed_range(&self, model: &OmniModel, ids: &[u32], from: usize) -> Result<Tensor> {
        let embeds = model.thinker.embed(&ids[from..])?;
        let Some(front) = model.audio.as_ref().filter(|_| !self.clip_embeds.is_empty()) else {
            return Ok(embeds);
        };
        let before = ids[..from].iter().filter(|&&i| i == front.audio_pad).count();
        let inside = ids[from..].iter().filter(|&&i| i == front.audio_pad).count();
        if inside == 0 {
            return Ok(embeds);
        }
        let all = Tensor::cat(&self.clip_embeds, 0)?;
        let tokens = AudioTokens { embeddings: all.narrow(0, before, inside)?, per_clip: vec![inside] };
        scatter_audio(&embeds, &ids[from..], front.audio_pad, &tokens)
    }
}

/// What [`History::prefill_range`] leaves for the Talker and the decode loop.
struct Prefilled {
    /// Input embeddings of the new rows `[1, n, hidden]`.
    embeds: Tensor,
    /// The Talker's accepted Thinker states of the new rows `[n, hidden]` (with a Talker).
    accepted: Option<Tensor>,
    /// Final-norm hidden states of the last chunk.
    last_hidden: Tensor,
}

impl History {
    /// Prefills `ids[from..]` into the KV cache in [`PREFILL_CHUNK`]s, capturing the states the
    /// Talker's user rows need; `self.ids` becomes `ids`.
    fn prefill_range(
        &mut self,
        model: &OmniModel,
        talker: Option<&Talker>,
        ids: &[u32],
        from: usize,
        cancel: &CancelToken,
    ) -> Result<Prefilled> {
        let thinker = &model.thinker;
        let embeds = self.embed_range(model, ids, from)?;
        let (which, capture) = match talker {
            Some(t) => {
                let (w, c) = accepted_state(t, thinker)?;
                (Some(w), c)
            }
            None => (None, Vec::new()),
        };
        let n = ids.len() - from;
        let (mut last_hidden, mut accepted) = (None, Vec::new());
        let mut at = 0;
        while at < n {
            if cancel.is_cancelled() {
                bail!("cancelled during the prefill");
            }
            let len = PREFILL_CHUNK.min(n - at);
            let chunk = embeds.narrow(1, at, len)?;
            let step = thinker.forward(&chunk, &text_positions((from + at) as i64, len), &mut self.cache, &capture)?;
            if let Some(w) = which {
                accepted.push(accepted_rows(w, &chunk, &step));
            }
            last_hidden = Some(step.hidden);
            at += len;
        }
        self.ids = ids.to_vec();
        let accepted = if accepted.is_empty() { None } else { Some(Tensor::cat(&accepted, 1)?.squeeze(0)?) };
        Ok(Prefilled { embeds, accepted, last_hidden: last_hidden.context("empty prefill")? })
    }

    /// The ids every next user turn starts with: the history as rendered, then the template's
    /// opening of a user turn. Two unlike probe turns (one audio clip; the text "a") are rendered
    /// and only what they share is taken (one text turn "b" in place of the clip for a model without audio), so no part of the user's content is guessed.
    fn next_turn_prefix(&self, model: &OmniModel) -> Result<Vec<u32>> {
        let render = |content: ContentItem, clip_tokens: &[usize]| -> Result<Vec<u32>> {
            let mut messages = self.messages.clone();
            messages.push(ChatMessage { role: "user".into(), content: vec![content] });
            let ids = model.tokenizer.encode(&model.template.render(&messages, true)?)?;
            match model.audio.as_ref() {
                Some(front) if !clip_tokens.is_empty() => expand_audio_pads(&ids, front.audio_pad, clip_tokens),
                _ => Ok(ids),
            }
        };
        let text = render(ContentItem::Text { text: "a".into() }, &self.clip_tokens)?;
        let other = if model.audio.is_some() {
            let mut clips = self.clip_tokens.clone();
            clips.push(1);
            render(ContentItem::Audio { audio: format!("clip-{}", self.clip_tokens.len()) }, &clips)?
        } else {
            render(ContentItem::Text { text: "b".into() }, &self.clip_tokens)?
        };
        let common = text.iter().zip(&other).take_while(|(a, b)| a == b).count();
        Ok(text[..common].to_vec())
    }

    /// Prefills the start of the next user turn's prompt (see [`Self::next_turn_prefix`]) while the
    /// user has not spoken yet, so that at the end of their speech only their own tokens and the
    /// assistant's opening remain. Returns how many tokens were prefilled.
    /// On an error the KV cache is dropped (the next turn rebuilds it); the messages stay.
    pub fn prime(&mut self, model: &OmniModel, speech: Option<&SpeechModels>, cancel: &CancelToken) -> Result<usize> {
        let primed = self.prime_cache(model, speech, cancel);
        if primed.is_err() {
            self.drop_cache(model);
        }
        primed
    }

    fn prime_cache(&mut self, model: &OmniModel, speech: Option<&SpeechModels>, cancel: &CancelToken) -> Result<usize> {
        let prefix = self.next_turn_prefix(model)?;
        let from = self.ids.len();
        if prefix.len() <= from || !prefix.starts_with(&self.ids) {
            return Ok(0);
        }
        let talker = speech.map(|s| &s.talker);
        let Prefilled { embeds, accepted, .. } = self.prefill_range(model, talker, &prefix, from, cancel)?;
        if let Some(s) = speech {
            let rows = user_rows(&s.talker, &s.ids, &prefix, from, &embeds.squeeze(0)?, accepted.as_ref())?;
            self.user_rows.extend(rows);
        }
        Ok(prefix.len() - from)
    }
}

/// Until the first audio chunk is out, the Thinker decodes at most `ahead` tokens (the first chunk's
/// frames: frame k takes token k) past the Talker's frames: further tokens are not needed yet and
/// their decode steps would take the same cores as the frames of the first chunk (measured: ~0.4 s
/// later first audio on the lent CPU).
struct FirstAudioPace {
    ahead: usize,
    frames: AtomicUsize,
    open: AtomicBool,
    lock: Mutex<()>,
    changed: Condvar,
}

impl FirstAudioPace {
    fn new(ahead: usize) -> Self {
        Self { ahead: ahead.max(1), frames: AtomicUsize::new(0), open: AtomicBool::new(false), lock: Mutex::new(()), changed: Condvar::new() }
    }

    fn notify(&self) {
        let _guard = self.lock.lock();
        self.changed.notify_all();
    }

    fn frame_done(&self) {
        self.frames.fetch_add(1, Ordering::SeqCst);
        self.notify();
    }

    /// The first chunk is out, or the Talker has stopped: no more waiting.
    fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
        self.notify();
    }

    /// Blocks the Thinker, `generated` tokens in, while it is far enough ahead of the Talker.
    fn wait(&self, generated: usize, cancel: &CancelToken) {
        let Ok(mut guard) = self.lock.lock() else { return };
        while !self.open.load(Ordering::SeqCst)
            && !cancel.is_cancelled()
            && generated >= self.frames.load(Ordering::SeqCst) + self.ahead
        {
            match self.changed.wait_timeout(guard, std::time::Duration::from_millis(5)) {
                Ok((g, _)) => guard = g,
                Err(_) => return,
            }
        }
    }
}

/// Opens the pace when the Talker thread ends, however it ends.
struct OpenOnDrop<'a>(&'a FirstAudioPace);

impl Drop for OpenOnDrop<'_> {
    fn drop(&mut self) {
        self.0.open();
    }
}

/// Everything one answer needs, moved to the worker thread.
pub struct TurnJob {
    pub model: Arc<OmniModel>,
    pub speech: Option<(Arc<SpeechModels>, u32)>,
    pub opts: ConversationOptions,
    pub turn: TurnInput,
    pub cancel: CancelToken,
    pub events: Sender<AnswerEvent>,
}

/// Runs one answer and gives the history back; errors end the stream with [`AnswerEvent::Error`] and
/// leave the history as before the turn (KV cache dropped: the next turn rebuilds it).
pub fn run(job: TurnJob, mut history: History) -> History {
    let start = Instant::now();
    let (messages_before, clips_before) = (history.messages.len(), history.clip_tokens.len());
    match answer(&job, &mut history, start) {
        Ok(summary) => {
            let _ = job.events.send(AnswerEvent::Done(summary));
        }
        Err(e) => {
            history.messages.truncate(messages_before);
            history.clip_tokens.truncate(clips_before);
            history.clip_embeds.truncate(clips_before);
            history.last_answer = None;
            history.drop_cache(&job.model);
            let _ = job.events.send(AnswerEvent::Error(format!("{e:#}")));
        }
    }
    history
}

fn ms(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}

/// Encodes the turn's clips; returns the encoder output of each.
fn encode_clips(model: &OmniModel, clips: &[Vec<f32>]) -> Result<Vec<Tensor>> {
    if clips.is_empty() {
        return Ok(Vec::new());
    }
    let front = model.audio.as_ref().with_context(|| {
        format!("{} has no audio encoder (thinker.audio_tower): audio input is not possible", model.dir.display())
    })?;
    let refs: Vec<&[f32]> = clips.iter().map(Vec::as_slice).collect();
    let mel = front.mel.extract(&refs)?;
    let valid: Vec<Vec<f32>> = (0..mel.batch_size()).map(|i| mel.clip_valid(i)).collect();
    let feats: Vec<ClipFeatures<'_>> =
        valid.iter().zip(&mel.valid_frames).map(|(m, &frames)| ClipFeatures { mel: m, frames }).collect();
    let tokens = front.encoder.forward(&feats)?;
    let mut out = Vec::new();
    let mut at = 0;
    for &n in &tokens.per_clip {
        out.push(tokens.embeddings.narrow(0, at, n)?);
        at += n;
    }
    Ok(out)
}

/// The encoder output of each clip of an already encoded turn.
fn split_clips(tokens: &AudioTokens) -> Result<Vec<Tensor>> {
    let mut out = Vec::with_capacity(tokens.per_clip.len());
    let mut at = 0;
    for &n in &tokens.per_clip {
        out.push(tokens.embeddings.narrow(0, at, n).context("encoded user turn: audio tokens")?);
        at += n;
    }
    Ok(out)
}

fn answer(job: &TurnJob, h: &mut History, start: Instant) -> Result<TurnSummary> {
    let model = &*job.model;
    let mut timings = TurnTimings::default();
    // 1. The new user turn in the history; its clips through the audio encoder.
    let clip_embeds = match &job.turn {
        TurnInput::Samples(t) => encode_clips(model, &t.audio)?,
        TurnInput::Encoded(t) => split_clips(&t.audio)?,
    };
    timings.audio_encode_ms = ms(start);
    h.messages.push(user_message(&job.turn, h.clip_tokens.len()));
    h.clip_tokens.extend(clip_embeds.iter().map(|e| e.dim(0)).collect::<candle_core::Result<Vec<_>>>()?);
    h.clip_embeds.extend(clip_embeds);
    let ids = h.render(model, true)?;
    // 2. Reuse the longest cached prefix (see the module docs).
    let common = h.ids.iter().zip(&ids).take_while(|(a, b)| a == b).count();
    if common < h.ids.len() {
        if !(h.snapshot.is_some_and(|l| l <= common) && h.restore_snapshot()) {
            h.drop_cache(model);
        }
    }
    h.snapshot = None;
    let from = h.ids.len();
    if from >= ids.len() {
        bail!("the chat template rendered no new tokens for the user turn");
    }
    // 3. Prefill the new ids, keeping the accepted Thinker states for the Talker's user rows.
    let prefill_start = Instant::now();
    let speech = job.speech.as_ref();
    let Prefilled { embeds, accepted, last_hidden } =
        h.prefill_range(model, speech.map(|(s, _)| &s.talker), &ids, from, &job.cancel)?;
    h.ids = ids.clone();
    h.snapshot = Some(ids.len());
    timings.prefill_ms = prefill_start.elapsed().as_secs_f64() * 1e3;
    let _ = job.events.send(AnswerEvent::Prefilled {
        prompt_tokens: ids.len(),
        reused_tokens: from,
        prefill_ms: timings.prefill_ms,
    });

    // 4. The Talker thread (scoped: it borrows the models) and the Thinker's decode loop.
    let eos_ids = match &job.opts.stop_ids {
        Some(ids) => ids.clone(),
        None => model.eos_ids()?,
    };
    let head = &ids[assistant_start_or_end(&ids, speech)?..];
    let (feed_tx, feed_rx) = crossbeam_channel::unbounded::<TextFeed>();
    let opts = &job.opts;
    let first_audio = std::sync::Mutex::new(None::<f64>);
    let pace = speech.map(|_| FirstAudioPace::new(job.opts.chunking.first_chunk_frames));
    let prior_rows = std::mem::take(&mut h.user_rows);
    let (gen, finish, speech_out, new_rows) = std::thread::scope(|scope| -> Result<_> {
        let talker = speech.map(|(s, speaker_id)| {
            let (feed_rx, events, cancel) = (feed_rx.clone(), job.events.clone(), job.cancel.clone());
            let (embeds, accepted, prior, first_audio) = (&embeds, &accepted, &prior_rows, &first_audio);
            let pace = pace.as_ref().expect("a pace with speech");
            let ids = &ids;
            std::thread::Builder::new().name("omni-talker".into()).spawn_scoped(scope, move || -> Result<_> {
                let _open = OpenOnDrop(pace);
                // The user rows of the new positions, then the frame loop.
                let new_rows = user_rows(&s.talker, &s.ids, ids, from, &embeds.squeeze(0)?, accepted.as_ref())?;
                let rows: Vec<Tensor> = prior.iter().chain(&new_rows).map(|(_, r)| r.clone()).collect();
                let setup = SpeechSetup {
                    models: s,
                    thinker: &model.thinker,
                    speaker_id: *speaker_id,
                    params: &opts.talker,
                    user_rows: &rows,
                    head,
                    chunking: Some(opts.chunking),
                };
                let out = run_speech(
                    &setup,
                    &feed_rx,
                    &cancel,
                    |_| {
                        pace.frame_done();
                        Ok(true)
                    },
                    |chunk| {
                        pace.open();
                        let mut first = first_audio.lock().map_err(|_| anyhow::anyhow!("timing lock poisoned"))?;
                        if first.is_none() {
                            *first = Some(ms(start));
                        }
                        drop(first);
                        let _ = events.send(AnswerEvent::AudioChunk(chunk));
                        Ok(())
                    },
                )?;
                Ok((out, new_rows))
            })
        });
        let talker = talker.transpose().context("cannot start the Talker thread")?;
        drop(feed_rx);
        let thinker_result = decode(job, h, &ids, &last_hidden, &eos_ids, &feed_tx, pace.as_ref(), start, &mut timings);
        // On a Thinker error the Talker sees the closed channel and stops.
        drop(feed_tx);
        let talker_result = match talker {
            Some(t) => t.join().map_err(|_| anyhow::anyhow!("the Talker thread panicked"))?.map(Some),
            None => Ok(None),
        };
        let (gen, finish) = thinker_result?;
        let (speech_out, new_rows) = match talker_result? {
            Some((out, rows)) => (Some(out), rows),
            None => (None, Vec::new()),
        };
        Ok((gen, finish, speech_out, new_rows))
    })?;
    h.user_rows = prior_rows;
    h.user_rows.extend(new_rows);
    timings.first_audio_ms = *first_audio.lock().map_err(|_| anyhow::anyhow!("timing lock poisoned"))?;

    // 5. The answer into the history: after a barge-in, only the text already turned into audio.
    let text = model.tokenizer.decode(&gen, true)?;
    let speech_out =
        speech_out.unwrap_or(SpeechOutput { codes: Vec::new(), finish: None, samples: 0, spoken_tokens: 0 });
    let kept = if finish == FinishReason::Cancelled && job.speech.is_some() {
        speech_out.spoken_tokens.min(gen.len())
    } else {
        gen.len()
    };
    let kept_text = model.tokenizer.decode(&gen[..kept], true)?;
    h.messages.push(ChatMessage { role: "assistant".into(), content: vec![ContentItem::Text { text: kept_text }] });
    h.last_answer = Some(gen.clone());
    let rendered = h.render(model, false)?;
    if !rendered.starts_with(&h.ids) {
        h.restore_snapshot();
    }
    if finish != FinishReason::Cancelled {
        h.snapshot = None;
    }
    timings.total_ms = ms(start);
    Ok(TurnSummary {
        token_ids: gen,
        text,
        finish,
        codes: speech_out.codes,
        speech_finish: speech_out.finish,
        audio_samples: speech_out.samples,
        prompt_tokens: ids.len(),
        reused_tokens: from,
        timings,
    })
}

/// Where the Talker's assistant text starts (with speech the prompt must have an assistant turn).
fn assistant_start_or_end(ids: &[u32], speech: Option<&(Arc<SpeechModels>, u32)>) -> Result<usize> {
    match speech {
        Some((s, _)) => assistant_start(ids, &s.ids),
        None => Ok(ids.len()),
    }
}

/// The Thinker's decode loop: returns the generated ids (eos excluded) and why it stopped.
#[allow(clippy::too_many_arguments)]
fn decode(
    job: &TurnJob,
    h: &mut History,
    prompt: &[u32],
    last_hidden: &Tensor,
    eos_ids: &[u32],
    feed: &Sender<TextFeed>,
    pace: Option<&FirstAudioPace>,
    start: Instant,
    timings: &mut TurnTimings,
) -> Result<(Vec<u32>, FinishReason)> {
    let model = &*job.model;
    let thinker = &model.thinker;
    let max = job.opts.max_new_tokens;
    let mut sampler = Sampler::new(job.opts.sampling.clone());
    let mut seen = prompt.to_vec();
    let mut logits = thinker.last_logits(last_hidden)?;
    let mut streamer = TextStreamer::new();
    let mut gen = Vec::new();
    let finish = loop {
        if job.cancel.is_cancelled() {
            let _ = feed.send(TextFeed::Stop);
            break FinishReason::Cancelled;
        }
        // 1. The next id; the Talker hears of it first.
        let id = sampler.sample(&mut logits, &seen);
        let eos = eos_ids.contains(&id);
        let last = eos || gen.len() + 1 == max;
        let _ = feed.send(TextFeed::Token { id, last, eos });
        if eos {
            break FinishReason::Eos;
        }
        gen.push(id);
        seen.push(id);
        if timings.first_token_ms.is_none() {
            timings.first_token_ms = Some(ms(start));
        }
        let text = streamer.push(&model.tokenizer, id)?.unwrap_or_default();
        let _ = job.events.send(AnswerEvent::TextDelta { text, token_id: id });
        if let Some(hook) = &job.opts.after_token {
            hook(gen.len());
        }
        if last {
            break FinishReason::Length;
        }
        // 2. Forward it (the last id of a turn is not: the next turn's prefill takes it if it stays).
        if let Some(p) = pace {
            p.wait(gen.len(), &job.cancel);
        }
        let pos = h.ids.len() as i64;
        let step = thinker.forward(&thinker.embed(&[id])?, &text_positions(pos, 1), &mut h.cache, &[])?;
        h.ids.push(id);
        logits = thinker.last_logits(&step.hidden)?;
    };
    if let Some(rest) = streamer.finish(&model.tokenizer)? {
        if let Some(&last) = gen.last() {
            let _ = job.events.send(AnswerEvent::TextDelta { text: rest, token_id: last });
        }
    }
    timings.thinker_ms = ms(start);
    let _ = job.events.send(AnswerEvent::ThinkerDone { finish, tokens: gen.len(), elapsed_ms: timings.thinker_ms });
    Ok((gen, finish))
}

//! The Talker's input, assembled from a Thinker run exactly as the reference does.
//!
//! Reference: `Qwen3OmniMoeForConditionalGeneration.generate` (step "2. Prepare talker input"),
//! `_get_talker_user_parts` and `_get_talker_assistant_parts`. From the Thinker run it takes, per
//! forwarded position, the layer-0 input embeddings (`hidden_states[0]`) and the states of layer
//! `accept_hidden_layer` (`hidden_states[accept_hidden_layer]`). The prefill is
//!
//! 1. the user turns (tokens whose latest `<|im_start|>` is followed by the user role), in order:
//!    `hidden_projection(hidden)` at audio/image/video tokens, `text_projection(embed)` elsewhere;
//! 2. nine assistant rows, `text + codec`: `text_projection` of `<|im_start|>assistant\n` plus zeros;
//!    then `tts_pad` ×4 plus `codec_embedding` of nothink, think_bos, think_eos, the speaker; `tts_bos`
//!    plus `codec_pad`; the first generated token's projection plus `codec_bos`.
//!
//! The trailing text, one row per Talker step, is the projection of generated tokens 2.. then
//! `tts_eos`; past the Thinker's first eos it is `tts_pad` (eos row at the eos position). After the
//! trailing rows run out every step adds `tts_pad`.

use anyhow::{bail, Context, Result};
use candle_core::Tensor;

use crate::config::OmniConfig;

use super::Talker;

/// Token ids the assembly needs (from config.json).
#[derive(Debug, Clone)]
pub struct SpecialIds {
    pub im_start: u32,
    pub user: u32,
    pub assistant: u32,
    pub tts_bos: u32,
    pub tts_eos: u32,
    pub tts_pad: u32,
    /// Thinker ids whose positions carry encoder output (audio, image, video pads).
    pub multimodal: Vec<u32>,
}

impl SpecialIds {
    pub fn from_config(cfg: &OmniConfig) -> Result<Self> {
        let need =
            |v: Option<u32>, name: &str| v.with_context(|| format!("config.json has no {name}"));
        let t = &cfg.thinker_config;
        Ok(Self {
            im_start: need(cfg.im_start_token_id, "im_start_token_id")?,
            user: need(cfg.user_token_id.or(t.user_token_id), "user_token_id")?,
            assistant: need(cfg.assistant_token_id, "assistant_token_id")?,
            tts_bos: need(cfg.tts_bos_token_id, "tts_bos_token_id")?,
            tts_eos: need(cfg.tts_eos_token_id, "tts_eos_token_id")?,
            tts_pad: need(cfg.tts_pad_token_id, "tts_pad_token_id")?,
            multimodal: [t.audio_token_id, t.image_token_id, t.video_token_id]
                .into_iter()
                .flatten()
                .collect(),
        })
    }
}

/// Which Thinker state the reference's `hidden_states[accept_hidden_layer]` is: index 0 holds the
/// input embeddings, index k the output of decoder layer k - 1, and the last index (k = number of
/// layers) the final-norm state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptedState {
    Embeddings,
    /// Output of this decoder layer (0-based), to capture in `ThinkerText::forward`.
    LayerOutput(usize),
    FinalNorm,
}

impl AcceptedState {
    pub fn new(accept_hidden_layer: usize, thinker_layers: usize) -> Result<Self> {
        Ok(match accept_hidden_layer {
            0 => Self::Embeddings,
            k if k < thinker_layers => Self::LayerOutput(k - 1),
            k if k == thinker_layers => Self::FinalNorm,
            k => bail!("accept_hidden_layer {k} exceeds the Thinker's {thinker_layers} layers"),
        })
    }
}

/// What the Talker needs from one Thinker run.
#[derive(Debug, Clone)]
pub struct ThinkerStates<'a> {
    /// Prompt then generated ids (the reference's `thinker_result.sequences`, eos included if any).
    pub sequence: &'a [u32],
    pub prompt_len: usize,
    /// Layer-0 input embeddings `[n, thinker_hidden]` of `sequence[..n]` (the positions forwarded:
    /// usually all but the last generated id).
    pub embeds: &'a Tensor,
    /// States of `accept_hidden_layer` `[n, thinker_hidden]` of the same positions.
    pub hidden: &'a Tensor,
    /// Thinker embeddings `[3, thinker_hidden]` of `tts_bos`, `tts_eos`, `tts_pad`.
    pub tts_embeds: &'a Tensor,
    /// The Thinker's eos ids (`thinker_eos_token_id`).
    pub eos_ids: &'a [u32],
}

/// The Talker's prefill and per-step conditioning.
#[derive(Debug, Clone)]
pub struct TalkerInput {
    /// `[1, t, talker_hidden]`.
    pub prefill: Tensor,
    /// Text rows added at step 1, 2, … `[m, talker_hidden]`.
    pub trailing: Tensor,
    /// `text_projection(tts_pad)` `[1, 1, talker_hidden]`, added once `trailing` is used up.
    pub tts_pad: Tensor,
}

impl TalkerInput {
    /// Builds the input for voice `speaker_id` (a codec id from `talker_config.speaker_id`).
    pub fn build(
        talker: &Talker,
        ids: &SpecialIds,
        st: &ThinkerStates<'_>,
        speaker_id: u32,
    ) -> Result<Self> {
        let cfg = talker.config();
        let seq = st.sequence;
        let p = st.prompt_len;
        let n = st.embeds.dim(0)?;
        if st.hidden.dim(0)? != n || n > seq.len() || p > n || p == 0 {
            bail!(
                "inconsistent Thinker states: {n} rows for {} ids, prompt {p}",
                seq.len()
            );
        }
        // 1. Projected special tokens: bos, eos, pad, each [1, H].
        let tts = talker.text_projection.forward(st.tts_embeds)?;
        let (tts_bos, tts_eos, tts_pad) = (
            tts.narrow(0, 0, 1)?,
            tts.narrow(0, 1, 1)?,
            tts.narrow(0, 2, 1)?,
        );
        // 2. User rows: positions of the prompt whose latest <|im_start|> precedes the user role.
        let mut rows: Vec<Tensor> = Vec::new();
        let mut last_start: Option<usize> = None;
        for (i, &id) in seq[..p].iter().enumerate() {
            if id == ids.im_start {
                last_start = Some(i);
            }
            let role_pos = (last_start.unwrap_or(0) + 1).min(p - 1);
            if seq[role_pos] != ids.user {
                continue;
            }
            let row = if ids.multimodal.contains(&id) {
                talker
                    .hidden_projection
                    .forward(&st.hidden.narrow(0, i, 1)?)?
            } else {
                talker
                    .text_projection
                    .forward(&st.embeds.narrow(0, i, 1)?)?
            };
            rows.push(row);
        }
        // 3. The assistant rows: the last `<|im_start|>assistant` of the prompt.
        let a = (0..p.saturating_sub(1))
            .rev()
            .find(|&i| seq[i] == ids.im_start && seq[i + 1] == ids.assistant)
            .context("the prompt has no `<|im_start|>assistant` turn")?;
        if n < a + 4 {
            bail!("the Talker needs at least one generated token with its Thinker states");
        }
        let asst = talker
            .text_projection
            .forward(&st.embeds.narrow(0, a, n - a)?)?; // [n - a, H]
        let codec = talker.model.embed_codes(&[
            cfg.codec_nothink_id,
            cfg.codec_think_bos_id,
            cfg.codec_think_eos_id,
            speaker_id,
            cfg.codec_pad_id,
            cfg.codec_bos_id,
        ])?; // [6, H]
        rows.push(asst.narrow(0, 0, 3)?);
        for k in 0..4 {
            rows.push((&tts_pad + codec.narrow(0, k, 1)?)?);
        }
        rows.push((&tts_bos + codec.narrow(0, 4, 1)?)?);
        rows.push((asst.narrow(0, 3, 1)? + codec.narrow(0, 5, 1)?)?);
        let prefill = Tensor::cat(&rows, 0)?.unsqueeze(0)?;
        // 4. Trailing text: generated tokens 2.. then tts_eos; pad past the first Thinker eos.
        let mut trailing: Vec<Tensor> = (4..n - a)
            .map(|j| asst.narrow(0, j, 1))
            .collect::<candle_core::Result<_>>()?;
        trailing.push(tts_eos.clone());
        let generated = &seq[p..];
        let first_eos = generated
            .iter()
            .position(|id| st.eos_ids.contains(id))
            .unwrap_or(generated.len());
        for (j, row) in trailing.iter_mut().enumerate() {
            if j > first_eos {
                *row = tts_pad.clone();
            } else if j == first_eos {
                *row = tts_eos.clone();
            }
        }
        let trailing = Tensor::cat(&trailing, 0)?;
        Ok(Self {
            prefill,
            trailing,
            tts_pad: tts_pad.unsqueeze(0)?,
        })
    }
}

/// Rows the assistant part adds to the Talker prefill after the user rows
/// (`_get_talker_assistant_parts`: 3 text rows, 4 `tts_pad`, `tts_bos`, the first generated token).
pub const ASSISTANT_PREFILL_ROWS: usize = 9;

/// The Talker's own M-RoPE positions: the reference runs `get_rope_index` on `talker_input_ids` (the
/// user-turn ids, then `tts_pad` for the assistant rows) with the prompt's image grids, so image tokens
/// keep their `(t, h, w)` grid positions in the Talker too; every later step is at
/// `cache length + delta` on all three streams (`compute_3d_position_ids`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TalkerRope {
    /// Positions of the prefill rows (temporal, height, width).
    pub prefill: [Vec<i64>; 3],
    /// `max(prefill) + 1 - prefill length`.
    pub delta: i64,
}

impl TalkerRope {
    /// Derives the Talker positions from the Thinker's prompt positions `thinker` (three streams over
    /// the whole prompt) at the user positions `user` (ascending), followed by `assistant_rows` text
    /// rows. Why this equals `get_rope_index` on the Talker's ids: within a run of consecutive prompt
    /// positions the Thinker applied the same rule (text: previous max + 1; an image block: its grid
    /// offsets from previous max + 1), so the run only shifts by a constant; a run starts at a text
    /// token (`<|im_start|>`), which the Talker places at its own previous max + 1. Audio tokens are
    /// consecutive in both. The temporal stride of images (`position_id_per_seconds`) only matters for
    /// more than one temporal patch, which images never have (the processor repeats the one frame).
    pub fn from_thinker_positions(
        thinker: &[Vec<i64>; 3],
        user: &[usize],
        assistant_rows: usize,
    ) -> Result<Self> {
        let len = thinker[0].len();
        if thinker[1].len() != len || thinker[2].len() != len {
            bail!("Thinker positions: the three M-RoPE streams have different lengths");
        }
        let mut out: [Vec<i64>; 3] = Default::default();
        let mut next = 0i64; // the Talker's max position so far + 1
        let mut shift = 0i64;
        let mut prev: Option<usize> = None;
        for &i in user {
            if i >= len {
                bail!("user position {i} is past the {len} Thinker positions");
            }
            let p = [thinker[0][i], thinker[1][i], thinker[2][i]];
            if prev.map_or(true, |q| i != q + 1) {
                if p[0] != p[1] || p[1] != p[2] {
                    bail!("a user segment starts inside an image at prompt position {i}");
                }
                shift = next - p[0];
            }
            for (s, v) in out.iter_mut().zip(p) {
                s.push(v + shift);
                next = next.max(v + shift + 1);
            }
            prev = Some(i);
        }
        for _ in 0..assistant_rows {
            for s in out.iter_mut() {
                s.push(next);
            }
            next += 1;
        }
        let delta = next - out[0].len() as i64;
        Ok(Self {
            prefill: out,
            delta,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_state_follows_the_hidden_states_tuple() {
        assert_eq!(AcceptedState::new(0, 4).unwrap(), AcceptedState::Embeddings);
        assert_eq!(
            AcceptedState::new(3, 4).unwrap(),
            AcceptedState::LayerOutput(2)
        );
        assert_eq!(
            AcceptedState::new(24, 48).unwrap(),
            AcceptedState::LayerOutput(23)
        );
        assert_eq!(AcceptedState::new(4, 4).unwrap(), AcceptedState::FinalNorm);
        assert!(AcceptedState::new(5, 4).is_err());
    }

    #[test]
    fn talker_rope_rebases_user_segments() {
        // Prompt: system text 0..3, user: text 3..5, a 2x2 image block at 5..9 (grid from 5), text 9..11.
        let t = [
            vec![0, 1, 2, 3, 4, 5, 5, 5, 5, 7, 8],
            vec![0, 1, 2, 3, 4, 5, 5, 6, 6, 7, 8],
            vec![0, 1, 2, 3, 4, 5, 6, 5, 6, 7, 8],
        ];
        let user: Vec<usize> = (3..11).collect();
        let r = TalkerRope::from_thinker_positions(&t, &user, 2).unwrap();
        assert_eq!(r.prefill[0], vec![0, 1, 2, 2, 2, 2, 4, 5, 6, 7]);
        assert_eq!(r.prefill[1], vec![0, 1, 2, 2, 3, 3, 4, 5, 6, 7]);
        assert_eq!(r.prefill[2], vec![0, 1, 2, 3, 2, 3, 4, 5, 6, 7]);
        assert_eq!(r.delta, -2);
        // Text only: plain positions, delta 0.
        let plain = crate::thinker::rope::text_positions(0, 6);
        let r = TalkerRope::from_thinker_positions(&plain, &[1, 2, 4, 5], 3).unwrap();
        assert_eq!(r.prefill, crate::thinker::rope::text_positions(0, 7));
        assert_eq!(r.delta, 0);
    }
}

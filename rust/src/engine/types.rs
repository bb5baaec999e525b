//! What goes into and comes out of the batching engine.

use std::sync::Arc;

/// Draft tokens a step verifies at most unless a request says otherwise.
pub const DEFAULT_MAX_DRAFT: u32 = 16;
/// The least probability (by the draft model) of a draft token worth verifying unless a request
/// says otherwise: none, as llama-server's `--draft-p-min` default in the llama.cpp we ship. In
/// draft mode the costs stop a draft where its next guess would not pay (`DraftBudget`), which
/// weighs a guess's probability against what its row costs on this machine; a fixed floor
/// (llama.cpp's was 0.75) cut guesses that paid on 2 cores.
pub const DEFAULT_DRAFT_MIN_P: f32 = 0.0;

/// LoRA adapters applied together, as (index in the engine's table, scale): sorted by index,
/// no zero scales (`canonical`), so equal sets compare equal. libllama applies one set per
/// context, so sequences share a decode step only when their sets are equal.
pub type AdapterSet = Vec<(u32, f32)>;

/// A set as the batcher compares them: sorted by adapter, scale-0 entries (no effect) dropped;
/// None when an adapter is named twice.
pub fn canonical(mut set: AdapterSet) -> Option<AdapterSet> {
    set.retain(|&(_, scale)| scale != 0.0);
    set.sort_by_key(|&(i, _)| i);
    let unique = set.windows(2).all(|w| w[0].0 != w[1].0);
    unique.then_some(set)
}

/// Per-request sampling and stopping parameters (already validated by the server).
#[derive(Debug, Clone)]
pub struct Params {
    pub max_tokens: Option<u32>,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: i32,
    pub min_p: f32,
    pub seed: Option<u32>,
    pub repeat_penalty: f32,
    pub repeat_last_n: i32,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    pub ignore_eos: bool,
    pub stop: Vec<String>,
    pub n: u32,
    pub logprobs: Option<u32>,
    pub logit_bias: Vec<(i32, f32)>,
    pub grammar: Option<String>,
    /// Draft tokens by prompt lookup (`draft::Ngram`).
    pub ngram: bool,
    /// Draft tokens by the draft model loaded beside the target (`draft_model`), where one is.
    pub draft_model: bool,
    /// The least probability (by the draft model) of a draft token worth verifying.
    pub draft_min_p: f32,
    /// Draft by prompt lookup where it finds a match, else by the draft model (where
    /// `draft_model`), only as much as the measured step costs and acceptance say pays
    /// (`costs.rs`).
    pub auto: bool,
    /// Draft mode: the draft model's guesses are priced as they are made, and a step asks for
    /// none where none may pay (`DraftBudget`); false drafts up to `max_draft` (to
    /// `draft_min_p`) every step whatever the costs say, as llama-server does.
    pub adaptive: bool,
    /// The most draft tokens a step verifies (0: no speculation).
    pub max_draft: u32,
    /// The expected output's tokens (OpenAI's `prediction`): drafts, whatever `ngram` says.
    pub prediction: Vec<i32>,
    /// LoRA adapters for this request (`canonical`; empty: the bare model).
    pub adapters: AdapterSet,
}

impl Default for Params {
    /// llama-server's defaults.
    fn default() -> Self {
        Self {
            max_tokens: None,
            temperature: 0.8,
            top_p: 0.95,
            top_k: 40,
            min_p: 0.05,
            seed: None,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            ignore_eos: false,
            stop: Vec::new(),
            n: 1,
            logprobs: None,
            logit_bias: Vec::new(),
            grammar: None,
            ngram: false,
            draft_model: false,
            draft_min_p: DEFAULT_DRAFT_MIN_P,
            auto: false,
            adaptive: true,
            max_draft: DEFAULT_MAX_DRAFT,
            prediction: Vec::new(),
            adapters: Vec::new(),
        }
    }
}

impl Params {
    /// Nothing but the most likely token: no sampler chain needed.
    pub fn is_plain_greedy(&self) -> bool {
        self.temperature <= 0.0
            && self.logit_bias.is_empty()
            && self.grammar.is_none()
            && !self.has_penalties()
    }

    pub fn has_penalties(&self) -> bool {
        self.repeat_last_n != 0
            && (self.repeat_penalty != 1.0
                || self.frequency_penalty != 0.0
                || self.presence_penalty != 0.0)
    }
}

#[derive(Debug, Clone)]
pub struct Request {
    pub id: u64,
    /// Token ids; an image's positions hold placeholders (`vision::PLACEHOLDER`).
    pub prompt: Vec<i32>,
    pub params: Params,
    /// The prompt's images, in order of position.
    pub images: Vec<Arc<ImageInput>>,
}

/// An image of a prompt: where its tokens are, and its pixels for the encoder.
#[derive(Clone)]
pub struct ImageInput {
    pub start: usize,
    pub len: usize,
    /// Content hash: equal digests are equal images for the prefix cache.
    pub digest: String,
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
}

impl std::fmt::Debug for ImageInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ImageInput({}x{} at {}+{}, {})",
            self.width, self.height, self.start, self.len, self.digest
        )
    }
}

/// An encoded image: `len` rows of the text model's input embedding.
#[derive(Debug, Clone)]
pub struct Embedding {
    pub data: Vec<f32>,
    /// The model attends over the image's tokens both ways (Gemma 3).
    pub non_causal: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Finish {
    Stop,
    Length,
    Cancelled,
    Error(String),
}

impl Finish {
    pub fn as_str(&self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
            Finish::Cancelled => "cancelled",
            Finish::Error(_) => "error",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub cached_tokens: u32,
    pub completion_tokens: u32,
    /// From submission to the first generated token.
    pub ttft_ms: f64,
    /// From the first to the last generated token.
    pub gen_ms: f64,
    /// Draft tokens the model generated too (speculation), and those it did not.
    pub accepted_prediction_tokens: u32,
    pub rejected_prediction_tokens: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub text: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
    pub top: Vec<(String, Vec<u8>, f32)>,
}

/// One thing that happened to one choice of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub request: u64,
    pub choice: u32,
    pub text: String,
    /// The token sampled in this step (none for end-of-generation, flushed text and finishes).
    /// Tokens are reported when sampled, text when the stop matcher releases it: text a
    /// possible stop string holds back comes with a later token's event, and the tokens of a
    /// stop string are reported though its text never is.
    pub tokens: Vec<i32>,
    pub finish: Option<Finish>,
    pub logprobs: Vec<TokenLogprob>,
    pub usage: Option<Usage>,
}

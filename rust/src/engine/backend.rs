//! The batcher's backend over libllama: decode a batch, sample with llama.cpp's sampler chain.

use std::sync::{Arc, Mutex};

use super::batcher::{Backend, BatchItem};
use super::draft_model::DraftModel;
use super::types::{Params, TokenLogprob};
use crate::llama::{
    c_string, Adapter, Api, Ctx, LogitBias, Memory, RawBatch, Sampler, TokenData, TokenDataArray,
    Vocab,
};

/// The LoRA adapters loaded over the model (addresses of `llama_adapter_lora`), indexed as
/// requests name them (`Params::adapters`). Its lock is held around every llama_decode and
/// every adapter load: loading adds to the model's set of adapters, which a decode that
/// re-reserves its graph (after a switch) reads to size it.
pub type AdapterTable = Arc<Mutex<Vec<usize>>>;

/// Load a LoRA adapter over the model of `ctx` into `table`; its index.
///
/// # Safety
/// `ctx` must be a live llama context; the adapter lives as long as its model.
pub unsafe fn load_adapter(
    api: &Api,
    ctx: Ctx,
    table: &AdapterTable,
    path: &str,
) -> Result<u32, String> {
    let c = c_string(path)?;
    let mut table = table.lock().expect("poisoned");
    let adapter = (api.llama_adapter_lora_init)((api.llama_get_model)(ctx), c.as_ptr());
    if adapter.is_null() {
        return Err(format!("llama.cpp could not load the LoRA adapter {path}"));
    }
    table.push(adapter as usize);
    Ok(table.len() as u32 - 1)
}

/// `LLAMA_DEFAULT_SEED`: the dist sampler picks a random seed.
const RANDOM_SEED: u32 = 0xFFFF_FFFF;

pub struct LlamaBackend {
    api: Arc<Api>,
    ctx: Ctx,
    vocab: Vocab,
    mem: Memory,
    n_vocab: i32,
    batch: TokenBatch,
    speculation: bool,
    adapters: AdapterTable,
}

// SAFETY: the context is used by the engine thread only; llama.cpp contexts may move threads.
unsafe impl Send for LlamaBackend {}

/// A llama.cpp sampler chain, plus the grammar kept apart from it (see `sample`).
pub struct Chain {
    api: Arc<Api>,
    ptr: Sampler,
    grammar: Option<Sampler>,
}

impl Drop for Chain {
    fn drop(&mut self) {
        // SAFETY: the chain owns its samplers; each pointer is freed once.
        unsafe {
            (self.api.llama_sampler_free)(self.ptr);
            if let Some(g) = self.grammar {
                (self.api.llama_sampler_free)(g);
            }
        }
    }
}

// SAFETY: a chain is only touched by the thread that owns its sequence.
unsafe impl Send for Chain {}

impl LlamaBackend {
    /// # Safety
    /// `ctx` and `vocab` must be a live llama context and its model's vocabulary (made by
    /// llama-cpp-python) that outlive the backend and are used by no one else meanwhile.
    pub unsafe fn new(
        api: Arc<Api>,
        ctx: Ctx,
        vocab: Vocab,
        n_vocab: i32,
        capacity: usize,
    ) -> Self {
        let mem = (api.llama_get_memory)(ctx);
        Self {
            batch: TokenBatch::new(api.clone(), capacity),
            api,
            ctx,
            vocab,
            mem,
            n_vocab,
            speculation: true,
            adapters: AdapterTable::default(),
        }
    }

    /// The table of adapters requests choose from (shared with whoever loads them).
    pub fn with_adapters(mut self, table: AdapterTable) -> Self {
        self.adapters = table;
        self
    }

    /// Whether the model's cache can drop a sequence's last positions (see
    /// `Backend::can_speculate`): recurrent and hybrid models' cannot.
    pub fn with_speculation(mut self, on: bool) -> Self {
        self.speculation = on;
        self
    }

    fn add(&self, chain: Sampler, sampler: Sampler) {
        // SAFETY: the chain takes ownership of the sampler.
        unsafe { (self.api.llama_sampler_chain_add)(chain, sampler) }
    }

    fn logits(&self, index: i32) -> &[f32] {
        // SAFETY: batch item `index` of the last decode had its logits computed (n_vocab floats).
        unsafe {
            let ptr = (self.api.llama_get_logits_ith)(self.ctx, index);
            std::slice::from_raw_parts(ptr, self.n_vocab as usize)
        }
    }

    fn text(&self, token: i32) -> (String, Vec<u8>) {
        // SAFETY: vocab is valid while the model lives.
        let bytes = unsafe { self.api.piece(self.vocab, token) };
        (String::from_utf8_lossy(&bytes).into_owned(), bytes)
    }

    /// OpenAI logprobs: log-softmax of the raw logits for the chosen token and the top `k`.
    fn logprob(&self, index: i32, token: i32, k: u32) -> TokenLogprob {
        let logits = self.logits(index);
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let log_sum = logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln() + max;
        let mut top: Vec<(i32, f32)> = Vec::with_capacity(k as usize + 1);
        if k > 0 {
            for (i, &l) in logits.iter().enumerate() {
                if top.len() < k as usize || l > top[top.len() - 1].1 {
                    let at = top.partition_point(|&(_, v)| v >= l);
                    top.insert(at, (i as i32, l));
                    top.truncate(k as usize);
                }
            }
        }
        let (text, bytes) = self.text(token);
        TokenLogprob {
            text,
            bytes,
            logprob: logits[token as usize] - log_sum,
            top: top
                .into_iter()
                .map(|(t, l)| {
                    let (text, bytes) = self.text(t);
                    (text, bytes, l - log_sum)
                })
                .collect(),
        }
    }

    /// llama.cpp's own trick (common_sampler): sample without the grammar, and only when the
    /// grammar rejects that token run it over the whole vocabulary and sample again. Checking
    /// one token is cheap; constraining 50k-260k candidates every step is not.
    fn sample_with_grammar(&self, chain: Sampler, grammar: Sampler, index: i32) -> i32 {
        let api = &self.api;
        let candidates = |logits: &[f32]| -> Vec<TokenData> {
            logits
                .iter()
                .enumerate()
                .map(|(i, &logit)| TokenData {
                    id: i as i32,
                    logit,
                    p: 0.0,
                })
                .collect()
        };
        let mut cur = candidates(self.logits(index));
        let pick = |cur: &mut Vec<TokenData>, samplers: &[Sampler]| -> i32 {
            let mut arr = TokenDataArray {
                data: cur.as_mut_ptr(),
                size: cur.len(),
                selected: -1,
                sorted: false,
            };
            // SAFETY: arr points at `cur`, alive for these calls; samplers may shrink it.
            unsafe {
                for &s in samplers {
                    (api.llama_sampler_apply)(s, &mut arr);
                }
                (*arr.data.add(arr.selected.max(0) as usize)).id
            }
        };
        let mut token = pick(&mut cur, &[chain]);
        let mut single = [TokenData {
            id: token,
            logit: 1.0,
            p: 0.0,
        }];
        let mut one = TokenDataArray {
            data: single.as_mut_ptr(),
            size: 1,
            selected: -1,
            sorted: false,
        };
        // SAFETY: `one` points at `single`; the grammar only rewrites logits.
        unsafe { (api.llama_sampler_apply)(grammar, &mut one) };
        if single[0].logit == f32::NEG_INFINITY {
            let mut cur = candidates(self.logits(index));
            token = pick(&mut cur, &[grammar, chain]);
        }
        // SAFETY: both samplers are alive; accepting advances grammar state and penalties.
        unsafe {
            (api.llama_sampler_accept)(grammar, token);
            (api.llama_sampler_accept)(chain, token);
        }
        token
    }

    fn argmax(&self, index: i32) -> i32 {
        argmax(self.logits(index))
    }
}

impl Backend for LlamaBackend {
    type Sampler = Chain;

    fn new_sampler(&mut self, p: &Params) -> Result<Option<Chain>, String> {
        if p.is_plain_greedy() {
            return Ok(None); // argmax over raw logits: no candidate array per token
        }
        let api = &self.api;
        // SAFETY: building a chain from llama.cpp's constructors; the chain owns them all.
        let mut chain = Chain {
            api: api.clone(),
            ptr: unsafe {
                (api.llama_sampler_chain_init)((api.llama_sampler_chain_default_params)())
            },
            grammar: None,
        };
        unsafe {
            if !p.logit_bias.is_empty() {
                let bias: Vec<LogitBias> = p
                    .logit_bias
                    .iter()
                    .map(|&(token, bias)| LogitBias { token, bias })
                    .collect();
                let s = (api.llama_sampler_init_logit_bias)(
                    self.n_vocab,
                    bias.len() as i32,
                    bias.as_ptr(),
                );
                self.add(chain.ptr, s);
            }
            if let Some(grammar) = &p.grammar {
                let g = c_string(grammar)?;
                let root = c_string("root")?;
                let s = (api.llama_sampler_init_grammar)(self.vocab, g.as_ptr(), root.as_ptr());
                if s.is_null() {
                    return Err("the grammar does not parse (llama.cpp rejected it)".into());
                }
                chain.grammar = Some(s);
            }
            if p.has_penalties() {
                let s = (api.llama_sampler_init_penalties)(
                    self.n_vocab,
                    p.repeat_last_n,
                    p.repeat_penalty,
                    p.frequency_penalty,
                    p.presence_penalty,
                );
                self.add(chain.ptr, s);
            }
            if p.temperature <= 0.0 {
                self.add(chain.ptr, (api.llama_sampler_init_greedy)());
            } else {
                if p.top_k > 0 {
                    self.add(chain.ptr, (api.llama_sampler_init_top_k)(p.top_k));
                }
                if p.top_p < 1.0 {
                    self.add(chain.ptr, (api.llama_sampler_init_top_p)(p.top_p, 1));
                }
                if p.min_p > 0.0 {
                    self.add(chain.ptr, (api.llama_sampler_init_min_p)(p.min_p, 1));
                }
                self.add(chain.ptr, (api.llama_sampler_init_temp)(p.temperature));
                self.add(
                    chain.ptr,
                    (api.llama_sampler_init_dist)(p.seed.unwrap_or(RANDOM_SEED)),
                );
            }
        }
        Ok(Some(chain))
    }

    fn seq_rm(&mut self, seq: i32, from: i32) -> bool {
        // SAFETY: valid memory handle of our context.
        unsafe { (self.api.llama_memory_seq_rm)(self.mem, seq, from, -1) }
    }

    fn seq_state(&mut self, seq: i32, mut buf: Vec<u8>) -> Option<Vec<u8>> {
        if !self.speculation {
            return None; // a recurrent state cannot be cut back to a prefix after restoring
        }
        // SAFETY: our context; the buffer holds the size libllama just reported.
        unsafe {
            let size = (self.api.llama_state_seq_get_size)(self.ctx, seq);
            if size == 0 {
                return None;
            }
            // `buf` is an earlier save's (DiskCache::buffer): its pages are mapped already,
            // where a new one's first touch costs several times the copy
            buf.resize(size, 0);
            let n = (self.api.llama_state_seq_get_data)(self.ctx, buf.as_mut_ptr(), size, seq);
            (n == size).then_some(buf)
        }
    }

    fn set_seq_state(&mut self, seq: i32, state: &[u8]) -> bool {
        // SAFETY: our context; libllama reads `state.len()` bytes and checks their layout.
        unsafe {
            (self.api.llama_state_seq_set_data)(self.ctx, state.as_ptr(), state.len(), seq) != 0
        }
    }

    fn seq_cp(&mut self, src: i32, dst: i32, _len: i32) {
        // Sequences live in separate KV streams (kv_unified off), and llama.cpp copies across
        // streams only whole: the source holds exactly the prompt when this is called.
        // SAFETY: as above.
        unsafe { (self.api.llama_memory_seq_cp)(self.mem, src, dst, -1, -1) }
    }

    fn decode(&mut self, items: &[BatchItem]) -> Result<(), String> {
        let _loading = self.adapters.lock().expect("poisoned"); // see load_adapter
        self.batch.decode(self.ctx, items)
    }

    fn decode_embd(
        &mut self,
        seq: i32,
        pos: i32,
        rows: &[f32],
        n_tokens: usize,
        non_causal: bool,
        output: bool,
    ) -> Result<i32, String> {
        let n_embd = rows.len() / n_tokens.max(1);
        if n_tokens == 0 || n_embd * n_tokens != rows.len() {
            return Err("the image's embeddings do not match its token count".into());
        }
        // Attention over an image both ways needs all of it in one micro-batch.
        let capacity = self.batch.capacity;
        if non_causal && n_tokens > capacity {
            return Err(format!(
                "the image takes {n_tokens} tokens, more than the batch size ({capacity}): \
                 raise --batch-size"
            ));
        }
        let mut positions: Vec<i32> = (pos..pos + n_tokens as i32).collect();
        let mut n_seq_id = vec![1i32; n_tokens];
        let mut seq_ids = vec![seq; n_tokens];
        let mut seq_ptrs: Vec<*mut i32> = seq_ids.iter_mut().map(|s| s as *mut i32).collect();
        let mut logits = vec![0i8; n_tokens];
        if output {
            logits[n_tokens - 1] = 1;
        }
        let api = &self.api;
        let _loading = self.adapters.lock().expect("poisoned");
        // SAFETY: the batch points into vectors alive for the calls; llama_decode only reads
        // the embeddings. Causal attention is restored whatever happens.
        unsafe {
            if non_causal {
                (api.llama_set_causal_attn)(self.ctx, false);
            }
            let mut result = Ok(0);
            for from in (0..n_tokens).step_by(capacity) {
                let n = (n_tokens - from).min(capacity);
                let batch = RawBatch {
                    n_tokens: n as i32,
                    token: std::ptr::null_mut(),
                    embd: rows.as_ptr().add(from * n_embd).cast_mut(),
                    pos: positions.as_mut_ptr().add(from),
                    n_seq_id: n_seq_id.as_mut_ptr().add(from),
                    seq_id: seq_ptrs.as_mut_ptr().add(from),
                    logits: logits.as_mut_ptr().add(from),
                };
                let code = (api.llama_decode)(self.ctx, batch);
                if code != 0 {
                    result = Err(match code {
                        1 => "no room left in the KV cache".to_string(),
                        code => format!("error {code}"),
                    });
                    break;
                }
                result = Ok(n as i32 - 1);
            }
            if non_causal {
                (api.llama_set_causal_attn)(self.ctx, true);
            }
            result
        }
    }

    fn sample(
        &mut self,
        sampler: Option<&mut Chain>,
        index: i32,
        logprobs: Option<u32>,
    ) -> (i32, Option<TokenLogprob>) {
        let token = match sampler {
            // SAFETY: sampling from the logits of the last decode's output row.
            Some(Chain {
                ptr, grammar: None, ..
            }) => unsafe { (self.api.llama_sampler_sample)(*ptr, self.ctx, index) },
            Some(Chain {
                ptr,
                grammar: Some(g),
                ..
            }) => self.sample_with_grammar(*ptr, *g, index),
            None => self.argmax(index),
        };
        (token, logprobs.map(|k| self.logprob(index, token, k)))
    }

    fn can_speculate(&self) -> bool {
        self.speculation
    }

    fn set_adapters(&mut self, set: &[(u32, f32)]) -> Result<(), String> {
        let table = self.adapters.lock().expect("poisoned");
        let mut adapters = Vec::with_capacity(set.len());
        let mut scales = Vec::with_capacity(set.len());
        for &(i, scale) in set {
            let &address = table
                .get(i as usize)
                .ok_or_else(|| format!("no adapter {i} is loaded"))?;
            adapters.push(address as Adapter);
            scales.push(scale);
        }
        drop(table);
        // SAFETY: our context; the adapters were made for its model and live as long as it.
        // libllama copies the list (and changes nothing when it is the one applied).
        let code = unsafe {
            (self.api.llama_set_adapters_lora)(
                self.ctx,
                adapters.as_mut_ptr(),
                adapters.len(),
                scales.as_mut_ptr(),
            )
        };
        if code == 0 {
            Ok(())
        } else {
            Err(format!("llama_set_adapters_lora returned {code}"))
        }
    }

    fn set_threads(&mut self, n: i32) {
        // SAFETY: the context is ours; the setting applies from the next decode.
        unsafe { (self.api.llama_set_n_threads)(self.ctx, n, n) }
    }

    fn is_eog(&self, token: i32) -> bool {
        // SAFETY: vocab valid while the model lives.
        unsafe { (self.api.llama_vocab_is_eog)(self.vocab, token) }
    }

    fn piece(&self, token: i32) -> Vec<u8> {
        // SAFETY: vocab is valid while the model lives.
        unsafe { self.api.piece(self.vocab, token) }
    }
}

/// The draft model's context (`draft_model::DraftModel`): greedy guesses over its logits.
pub struct LlamaDraft {
    api: Arc<Api>,
    ctx: Ctx,
    mem: Memory,
    n_vocab: i32,
    batch: TokenBatch,
}

// SAFETY: as `LlamaBackend`: the engine thread alone uses the context.
unsafe impl Send for LlamaDraft {}

impl LlamaDraft {
    /// # Safety
    /// `ctx` must be a live llama context of a model with `n_vocab` tokens, made by
    /// llama-cpp-python, that outlives this and that no one else uses meanwhile.
    pub unsafe fn new(api: Arc<Api>, ctx: Ctx, n_vocab: i32, capacity: usize) -> Self {
        let mem = (api.llama_get_memory)(ctx);
        Self {
            batch: TokenBatch::new(api.clone(), capacity),
            api,
            ctx,
            mem,
            n_vocab,
        }
    }
}

impl DraftModel for LlamaDraft {
    fn decode(&mut self, items: &[BatchItem]) -> Result<(), String> {
        self.batch.decode(self.ctx, items)
    }

    fn top(&mut self, index: i32, with_p: bool) -> (i32, f32) {
        // SAFETY: row `index` of the last decode had its logits computed (n_vocab floats).
        let logits = unsafe {
            let ptr = (self.api.llama_get_logits_ith)(self.ctx, index);
            std::slice::from_raw_parts(ptr, self.n_vocab as usize)
        };
        let token = argmax(logits);
        if !with_p {
            return (token, 1.0);
        }
        let max = logits[token as usize];
        let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
        (token, 1.0 / sum)
    }

    fn seq_rm(&mut self, seq: i32, from: i32) -> bool {
        // SAFETY: valid memory handle of the draft's context.
        unsafe { (self.api.llama_memory_seq_rm)(self.mem, seq, from, -1) }
    }
}

/// A llama batch of up to `capacity` token rows of one sequence each, freed with it.
struct TokenBatch {
    api: Arc<Api>,
    raw: RawBatch,
    capacity: usize,
}

impl TokenBatch {
    fn new(api: Arc<Api>, capacity: usize) -> Self {
        // SAFETY: llama_batch_init allocates; Drop frees it once.
        let raw = unsafe { (api.llama_batch_init)(capacity as i32, 0, 1) };
        Self { api, raw, capacity }
    }

    /// One llama_decode of `items` on `ctx` (a live context of this batch's libllama).
    fn decode(&mut self, ctx: Ctx, items: &[BatchItem]) -> Result<(), String> {
        assert!(items.len() <= self.capacity, "batch larger than allocated");
        let b = &mut self.raw;
        // SAFETY: the arrays were allocated for `capacity` tokens with one seq id each.
        unsafe {
            for (i, item) in items.iter().enumerate() {
                *b.token.add(i) = item.token;
                *b.pos.add(i) = item.pos;
                *b.n_seq_id.add(i) = 1;
                *(*b.seq_id.add(i)) = item.seq;
                *b.logits.add(i) = i8::from(item.output);
            }
            b.n_tokens = items.len() as i32;
            match (self.api.llama_decode)(ctx, *b) {
                0 => Ok(()),
                1 => Err("no room left in the KV cache".into()),
                2 => Err("aborted".into()),
                code => Err(format!("error {code}")),
            }
        }
    }
}

impl Drop for TokenBatch {
    fn drop(&mut self) {
        // SAFETY: allocated by llama_batch_init in new().
        unsafe { (self.api.llama_batch_free)(self.raw) }
    }
}

/// Index of the largest logit. On the decode thread's critical path for every greedy token
/// (the vocabulary can be 260k entries), so the maximum is found lane-wise, which compiles to
/// SIMD, and only then its first position.
pub fn argmax(logits: &[f32]) -> i32 {
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = logits.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (m, &l) in lanes.iter_mut().zip(chunk) {
            *m = if l > *m { l } else { *m };
        }
    }
    let max = lanes
        .iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    logits.iter().position(|&l| l == max).unwrap_or(0) as i32
}

/// Pooled embeddings of each input, decoded one sequence at a time in its own context.
///
/// # Safety
/// `ctx` must be a live llama context created with embeddings on, `n_embd` its model's
/// embedding size, its batch size at least the longest input, and not used concurrently.
pub unsafe fn embed(
    api: &Api,
    ctx: Ctx,
    inputs: &[Vec<i32>],
    n_embd: usize,
    normalize: bool,
) -> Result<Vec<Vec<f32>>, String> {
    let capacity = inputs.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let mut batch = (api.llama_batch_init)(capacity as i32, 0, 1);
    let mem = (api.llama_get_memory)(ctx);
    let mut out = Vec::with_capacity(inputs.len());
    let mut result = Ok(());
    for tokens in inputs {
        unsafe {
            (api.llama_memory_clear)(mem, true);
            for (i, &t) in tokens.iter().enumerate() {
                *batch.token.add(i) = t;
                *batch.pos.add(i) = i as i32;
                *batch.n_seq_id.add(i) = 1;
                *(*batch.seq_id.add(i)) = 0;
                *batch.logits.add(i) = 1;
            }
            batch.n_tokens = tokens.len() as i32;
            let code = (api.llama_decode)(ctx, batch);
            if code != 0 {
                result = Err(format!("llama_decode failed with {code} while embedding"));
                break;
            }
            let ptr = (api.llama_get_embeddings_seq)(ctx, 0);
            if ptr.is_null() {
                result = Err("the embeddings context has no pooled output".into());
                break;
            }
            let mut v = std::slice::from_raw_parts(ptr, n_embd).to_vec();
            if normalize {
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                if norm > 0.0 {
                    v.iter_mut().for_each(|x| *x /= norm);
                }
            }
            out.push(v);
        }
    }
    (api.llama_batch_free)(batch);
    result.map(|()| out)
}

#[cfg(test)]
mod tests {
    use super::argmax;

    #[test]
    fn argmax_finds_the_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 2.0]), 1);
        let mut v: Vec<f32> = (0..1000).map(|i| (i % 97) as f32).collect();
        v[777] = 500.0;
        v[900] = 500.0;
        assert_eq!(argmax(&v), 777);
        assert_eq!(argmax(&[-5.0; 33]), 0);
        let mut tail = vec![0.0f32; 35];
        tail[34] = 1.0; // in the remainder after the 16-lane chunks
        assert_eq!(argmax(&tail), 34);
    }
}

//! The engine: a batcher on its own thread, fed through a command queue, reporting events.
//!
//! Callers (the Python binding) never wait for the decode loop: `submit` and `cancel` enqueue
//! and return, and the loop wakes its reader through a socket after each step that produced
//! events, so one `poll()` collects everything every sequence produced. In a runner process
//! the loop sends its events to the server itself instead (`send_to`, `wire`).
//!
//! A model with a projector also has an encoder thread: images the batcher asks for are
//! encoded there, one at a time (libmtmd's encode is not reentrant per context), and come
//! back as commands, so the decode loop keeps stepping the other sequences meanwhile. While
//! the encoder works the loop decodes with the threads it leaves free: more busy threads than
//! cores make ggml's spinning thread barriers stall for whole scheduler slices.

pub mod backend;
pub mod batcher;
pub mod costs;
pub mod draft;
pub mod draft_model;
pub mod kvstore;
pub mod types;
pub mod vision;
pub mod wire;

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use batcher::{Backend, Batcher, Counters, EncodeJob};
use types::{Embedding, Event, Finish, ImageInput, Request};

enum Command {
    Submit(Box<Request>, Instant),
    Cancel(u64),
    Encoded(u64, usize, Result<Embedding, String>),
}

/// Turns images into embeddings, on the encoder thread.
pub trait Encoder: Send {
    fn encode(&mut self, image: &ImageInput) -> Result<Embedding, String>;
}

/// The encoder thread's queue of images.
#[derive(Default)]
struct Jobs {
    queue: Mutex<VecDeque<EncodeJob>>,
    wake: Condvar,
    /// An image is being encoded.
    busy: AtomicBool,
}

impl Jobs {
    /// Drop the queued images of a request that ended (one being encoded finishes unused).
    fn forget(&self, request: u64) {
        self.queue
            .lock()
            .expect("poisoned")
            .retain(|j| j.request != request);
    }

    fn working(&self) -> bool {
        self.busy.load(Ordering::SeqCst) || !self.queue.lock().expect("poisoned").is_empty()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum SubmitError {
    QueueFull(usize),
    Invalid(String),
}

/// Numbers for metrics, readable from any thread.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Stats {
    pub queue_depth: u64,
    pub running: u64,
    pub counters: Counters,
    pub disk: kvstore::DiskStats,
}

#[derive(Default)]
struct Shared {
    commands: Mutex<VecDeque<Command>>,
    wake: Condvar,
    events: Mutex<Vec<Event>>,
    /// Where the loop sends events itself (`Engine::send_to`); None: they wait for `poll`.
    outbox: Mutex<Option<UnixDatagram>>,
    stop: AtomicBool,
    /// Requests submitted and neither finished nor cancelled, with their choices still running:
    /// at most `parallel` run, `max_queue` more may wait.
    outstanding: Mutex<HashMap<u64, u32>>,
    stats: Mutex<Stats>,
    jobs: Jobs,
}

pub struct Limits {
    pub ctx_size: usize,
    pub parallel: usize,
    pub max_queue: usize,
    pub n_vocab: i32,
    /// Decode threads, and how many of them while the encoder works (0: leave them as set).
    pub threads: (i32, i32),
}

pub struct Engine {
    shared: Arc<Shared>,
    limits: Limits,
    thread: Option<JoinHandle<()>>,
    encoder: Option<JoinHandle<()>>,
    reader: UnixStream,
}

impl Engine {
    /// Start the loop (and, with an `encoder`, the encoder thread: images are refused without).
    /// `disk` keeps the KV state of sequences made under its adapter set. A `draft` model
    /// drafts for the requests that ask for it.
    pub fn start<B>(
        backend: B,
        encoder: Option<Box<dyn Encoder>>,
        limits: Limits,
        batch_size: usize,
        disk: Option<(kvstore::DiskCache, types::AdapterSet)>,
        draft: Option<Box<dyn draft_model::DraftModel>>,
    ) -> std::io::Result<Self>
    where
        B: Backend + Send + 'static,
        B::Sampler: Send,
    {
        let (reader, writer) = UnixStream::pair()?;
        reader.set_nonblocking(true)?;
        writer.set_nonblocking(true)?;
        let shared = Arc::new(Shared::default());
        let mut batcher = Batcher::new(backend, limits.parallel, limits.ctx_size, batch_size);
        if let Some((disk, adapters)) = disk {
            batcher.disk = Some(disk);
            batcher.disk_adapters = adapters;
        }
        batcher.drafts = draft.map(|d| {
            draft_model::ModelDrafts::new(d, limits.parallel, batch_size, limits.ctx_size)
        });
        let thread_shared = shared.clone();
        let threads = limits.threads;
        let thread = std::thread::Builder::new()
            .name("xllm-batch".into())
            .spawn(move || run(batcher, &thread_shared, writer, threads))?;
        let encoder = match encoder {
            Some(e) => {
                let encoder_shared = shared.clone();
                Some(
                    std::thread::Builder::new()
                        .name("xllm-encode".into())
                        .spawn(move || encode(e, &encoder_shared))?,
                )
            }
            None => None,
        };
        Ok(Self {
            shared,
            limits,
            thread: Some(thread),
            encoder,
            reader,
        })
    }

    /// Why a request's images cannot be taken: no projector, or spans that do not fit its
    /// prompt's placeholders.
    fn check_images(&self, request: &Request) -> Result<(), String> {
        if request.images.is_empty() {
            return Ok(());
        }
        if self.encoder.is_none() {
            return Err("this model has no vision projector: it takes no images".into());
        }
        let mut end = 0;
        for (i, im) in request.images.iter().enumerate() {
            let fits = im.len > 0 && im.start >= end && im.start + im.len <= request.prompt.len();
            if !fits {
                return Err(format!("image {i} does not fit the prompt"));
            }
            if im.rgb.len() != im.width as usize * im.height as usize * 3 {
                return Err(format!(
                    "image {i}: its pixels are not {}x{} RGB",
                    im.width, im.height
                ));
            }
            end = im.start + im.len;
        }
        Ok(())
    }

    /// Why `tokens` cannot go to llama_decode: empty, or an id outside the vocabulary (which
    /// llama.cpp would refuse with a bare -1).
    pub fn check_tokens(&self, tokens: &[i32]) -> Result<(), String> {
        let n_vocab = self.limits.n_vocab;
        if tokens.is_empty() {
            return Err("no tokens to decode".into());
        }
        match tokens.iter().find(|&&t| t < 0 || t >= n_vocab) {
            Some(bad) => Err(format!(
                "token id {bad} is outside the vocabulary (0..{n_vocab})"
            )),
            None => Ok(()),
        }
    }

    pub fn submit(&self, request: Request) -> Result<(), SubmitError> {
        if self.thread.is_none() {
            return Err(SubmitError::Invalid("the engine is closed".into()));
        }
        let l = &self.limits;
        let p = &request.params;
        if request.prompt.is_empty() {
            return Err(SubmitError::Invalid("the prompt is empty".into()));
        }
        if request.prompt.len() >= l.ctx_size {
            return Err(SubmitError::Invalid(format!(
                "the prompt is {} tokens, the context holds {}",
                request.prompt.len(),
                l.ctx_size
            )));
        }
        self.check_images(&request).map_err(SubmitError::Invalid)?;
        // every position outside the images is a token of the vocabulary
        let mut from = 0;
        for im in request
            .images
            .iter()
            .map(|im| (im.start, im.start + im.len))
            .chain(std::iter::once((
                request.prompt.len(),
                request.prompt.len(),
            )))
        {
            if im.0 > from {
                self.check_tokens(&request.prompt[from..im.0])
                    .map_err(SubmitError::Invalid)?;
            }
            from = im.1;
        }
        if p.n == 0 || p.n as usize > l.parallel {
            return Err(SubmitError::Invalid(format!(
                "n must be between 1 and {} (parallel sequences)",
                l.parallel
            )));
        }
        if let Some(&(bad, _)) = p.logit_bias.iter().find(|(t, _)| *t < 0 || *t >= l.n_vocab) {
            return Err(SubmitError::Invalid(format!(
                "logit_bias token id {bad} is outside the vocabulary"
            )));
        }
        let mut commands = self.shared.commands.lock().expect("poisoned");
        let mut outstanding = self.shared.outstanding.lock().expect("poisoned");
        if outstanding.len() >= l.parallel + l.max_queue {
            return Err(SubmitError::QueueFull(l.max_queue));
        }
        outstanding.insert(request.id, p.n);
        drop(outstanding);
        commands.push_back(Command::Submit(Box::new(request), Instant::now()));
        self.shared.wake.notify_one();
        Ok(())
    }

    /// End a request. Its place counts as free at once, not when the loop gets to it after the
    /// step in progress: a client that leaves the queue must not cause a 503 for the next one.
    pub fn cancel(&self, id: u64) {
        self.shared
            .outstanding
            .lock()
            .expect("poisoned")
            .remove(&id);
        self.shared
            .commands
            .lock()
            .expect("poisoned")
            .push_back(Command::Cancel(id));
        self.shared.wake.notify_one();
    }

    /// Everything produced since the last call.
    pub fn poll(&self) -> Vec<Event> {
        let mut sink = [0u8; 256];
        while matches!((&self.reader).read(&mut sink), Ok(n) if n > 0) {}
        std::mem::take(&mut *self.shared.events.lock().expect("poisoned"))
    }

    /// From now on the loop sends events as `wire` packets on `socket` (a connected
    /// `SOCK_SEQPACKET` socket, blocking: a reader that falls behind holds the loop back)
    /// instead of keeping them for `poll`. Once the reader is gone, events are dropped.
    pub fn send_to(&self, socket: UnixDatagram) {
        *self.shared.outbox.lock().expect("poisoned") = Some(socket);
    }

    /// Readable when `poll` has something.
    pub fn wake_fd(&self) -> &UnixStream {
        &self.reader
    }

    pub fn stats(&self) -> Stats {
        self.shared.stats.lock().expect("poisoned").clone()
    }

    /// Stop the loop and the encoder: waiting and running requests end as cancelled.
    pub fn close(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        {
            let _queue = self.shared.jobs.queue.lock().expect("poisoned");
            self.shared.jobs.wake.notify_all();
        }
        if let Some(t) = self.encoder.take() {
            let _ = t.join();
        }
        *self.shared.outbox.lock().expect("poisoned") = None; // the reader sees the end
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.close();
    }
}

/// The encoder thread: one image at a time, results back to the loop as commands.
fn encode(mut encoder: Box<dyn Encoder>, shared: &Shared) {
    loop {
        let job = {
            let mut queue = shared.jobs.queue.lock().expect("poisoned");
            loop {
                if shared.stop.load(Ordering::SeqCst) {
                    return;
                }
                if let Some(job) = queue.pop_front() {
                    shared.jobs.busy.store(true, Ordering::SeqCst);
                    break job;
                }
                queue = shared.jobs.wake.wait(queue).expect("poisoned");
            }
        };
        let result = catch_unwind(AssertUnwindSafe(|| encoder.encode(&job.image)))
            .unwrap_or_else(|_| Err("internal error in the image encoder".into()));
        let mut commands = shared.commands.lock().expect("poisoned");
        commands.push_back(Command::Encoded(job.request, job.image.start, result));
        shared.jobs.busy.store(false, Ordering::SeqCst);
        shared.wake.notify_one();
    }
}

fn run<B: Backend>(
    mut batcher: Batcher<B>,
    shared: &Shared,
    mut notify: UnixStream,
    (threads, threads_encoding): (i32, i32),
) {
    let mut events = Vec::new();
    let mut sharing = false;
    // Whether the last step decoded anything: when not, only a command (a request, a cancel,
    // an encoded image) can give the loop something to do.
    let mut progressed = false;
    loop {
        let commands: Vec<Command> = {
            let mut queue = shared.commands.lock().expect("poisoned");
            while queue.is_empty()
                && (batcher.is_idle() || !progressed)
                && !shared.stop.load(Ordering::SeqCst)
            {
                queue = shared.wake.wait(queue).expect("poisoned");
            }
            queue.drain(..).collect()
        };
        let stopping = shared.stop.load(Ordering::SeqCst);
        if threads > 0 && shared.jobs.working() != sharing {
            sharing = !sharing;
            let n = if sharing { threads_encoding } else { threads };
            batcher.backend.set_threads(n);
        }
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            for command in commands {
                match command {
                    Command::Submit(request, at) => batcher.submit(*request, at),
                    Command::Cancel(id) => {
                        shared.jobs.forget(id);
                        batcher.cancel(id, &mut events);
                    }
                    Command::Encoded(id, start, result) => {
                        batcher.encoded(id, start, result, &mut events)
                    }
                }
            }
            if stopping {
                batcher.fail_all(Finish::Cancelled, &mut events);
                false
            } else {
                batcher.step(&mut events)
            }
        }));
        progressed = matches!(outcome, Ok(true));
        if !batcher.jobs.is_empty() {
            let mut queue = shared.jobs.queue.lock().expect("poisoned");
            queue.extend(batcher.jobs.drain(..));
            shared.jobs.wake.notify_one();
        }
        if let Err(panic) = outcome {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            let reason = Finish::Error(format!("internal error in the batching loop: {what}"));
            let _ = catch_unwind(AssertUnwindSafe(|| batcher.fail_all(reason, &mut events)));
        }
        {
            let mut stats = shared.stats.lock().expect("poisoned");
            stats.queue_depth = batcher.waiting() as u64;
            stats.running = batcher.running() as u64;
            stats.counters = batcher.counters.clone();
            stats.disk = batcher.disk.as_ref().map(|d| d.stats()).unwrap_or_default();
        }
        {
            let mut outstanding = shared.outstanding.lock().expect("poisoned");
            for e in events.iter().filter(|e| e.finish.is_some()) {
                if let Some(left) = outstanding.get_mut(&e.request) {
                    *left -= 1;
                    if *left == 0 {
                        outstanding.remove(&e.request);
                        shared.jobs.forget(e.request);
                    }
                }
            }
        }
        if !events.is_empty() {
            let mut outbox = shared.outbox.lock().expect("poisoned");
            if let Some(socket) = outbox.as_ref() {
                let sent = wire::encode(&events).iter().all(|p| send(socket, p));
                if !sent {
                    *outbox = None; // the server is gone: the runner ends with it
                }
                events.clear();
            } else {
                drop(outbox);
                shared.events.lock().expect("poisoned").append(&mut events);
                let _ = notify.write(&[1]); // a full socket already means "readable"
            }
        }
        // the finished requests' last events are out: now their states are copied for the disk
        let _ = catch_unwind(AssertUnwindSafe(|| batcher.save_finished()));
        if stopping {
            return;
        }
    }
}

fn send(socket: &UnixDatagram, packet: &[u8]) -> bool {
    loop {
        match socket.send(packet) {
            Ok(_) => return true,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::batcher::BatchItem;
    use super::types::{Embedding, ImageInput, Params, TokenLogprob};
    use super::*;
    use std::time::Duration;

    /// A step takes 20 ms and no sequence ends by itself: a request stays running for seconds.
    struct Slow;

    impl Backend for Slow {
        type Sampler = ();
        fn new_sampler(&mut self, _: &Params) -> Result<Option<()>, String> {
            Ok(None)
        }
        fn seq_rm(&mut self, _: i32, _: i32) -> bool {
            true
        }
        fn seq_cp(&mut self, _: i32, _: i32, _: i32) {}
        fn decode(&mut self, _: &[BatchItem]) -> Result<(), String> {
            std::thread::sleep(Duration::from_millis(20));
            Ok(())
        }
        fn sample(
            &mut self,
            _: Option<&mut ()>,
            _: i32,
            _: Option<u32>,
        ) -> (i32, Option<TokenLogprob>) {
            (1, None)
        }
        fn is_eog(&self, _: i32) -> bool {
            false
        }
        fn piece(&self, _: i32) -> Vec<u8> {
            b"x".to_vec()
        }
    }

    fn request(id: u64) -> Request {
        Request {
            id,
            prompt: vec![1, 2],
            params: Params {
                max_tokens: Some(500),
                ..Params::default()
            },
            images: Vec::new(),
        }
    }

    /// Encodes in 300 ms; records the thread counts the loop decoded with.
    struct SlowEncoder;

    impl Encoder for SlowEncoder {
        fn encode(&mut self, image: &ImageInput) -> Result<Embedding, String> {
            std::thread::sleep(Duration::from_millis(300));
            Ok(Embedding {
                data: vec![0.5; image.len * 2],
                non_causal: false,
            })
        }
    }

    /// `Slow`, also taking image embeddings and recording `set_threads`.
    struct SlowVision(Arc<Mutex<Vec<i32>>>);

    impl Backend for SlowVision {
        type Sampler = ();
        fn new_sampler(&mut self, _: &Params) -> Result<Option<()>, String> {
            Ok(None)
        }
        fn seq_rm(&mut self, _: i32, _: i32) -> bool {
            true
        }
        fn seq_cp(&mut self, _: i32, _: i32, _: i32) {}
        fn decode(&mut self, _: &[BatchItem]) -> Result<(), String> {
            std::thread::sleep(Duration::from_millis(5));
            Ok(())
        }
        fn decode_embd(
            &mut self,
            _: i32,
            _: i32,
            _: &[f32],
            n: usize,
            _: bool,
            _: bool,
        ) -> Result<i32, String> {
            Ok(n as i32 - 1)
        }
        fn sample(
            &mut self,
            _: Option<&mut ()>,
            _: i32,
            _: Option<u32>,
        ) -> (i32, Option<TokenLogprob>) {
            (1, None)
        }
        fn is_eog(&self, _: i32) -> bool {
            false
        }
        fn piece(&self, _: i32) -> Vec<u8> {
            b"x".to_vec()
        }
        fn set_threads(&mut self, n: i32) {
            self.0.lock().unwrap().push(n);
        }
    }

    #[test]
    fn streams_go_on_while_an_image_encodes_with_the_threads_it_leaves() {
        let threads = Arc::new(Mutex::new(Vec::new()));
        let limits = Limits {
            ctx_size: 1000,
            parallel: 2,
            max_queue: 1,
            n_vocab: 10,
            threads: (4, 2),
        };
        let backend = SlowVision(threads.clone());
        let engine = Engine::start(backend, Some(Box::new(SlowEncoder)), limits, 8, None, None)
            .expect("engine");
        engine.submit(request(1)).expect("text");
        std::thread::sleep(Duration::from_millis(50));
        let mut image = request(2);
        image.prompt = vec![1, -1, -1, -1, 2];
        image.params.max_tokens = Some(1);
        image.images = vec![Arc::new(ImageInput {
            start: 1,
            len: 3,
            digest: "d".into(),
            width: 1,
            height: 1,
            rgb: vec![0; 3],
        })];
        engine.submit(image).expect("image");
        let start = Instant::now();
        let mut during = 0;
        let deadline = start + Duration::from_secs(10);
        loop {
            let events = engine.poll();
            if events.iter().any(|e| e.request == 2 && e.finish.is_some()) {
                assert_eq!(
                    events
                        .iter()
                        .find(|e| e.request == 2 && e.finish.is_some())
                        .unwrap()
                        .finish,
                    Some(Finish::Length)
                );
                break;
            }
            during += events.iter().filter(|e| e.request == 1).count();
            assert!(
                Instant::now() < deadline,
                "the image request never finished"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(start.elapsed() >= Duration::from_millis(300));
        // the text stream kept decoding (5 ms steps) through the 300 ms encode
        assert!(during > 20, "only {during} tokens while the image encoded");
        // while encoding the loop decoded with 2 threads, then with all 4 again
        assert_eq!(*threads.lock().unwrap(), vec![2, 4]);
    }

    #[test]
    fn images_without_an_encoder_are_refused() {
        let limits = Limits {
            ctx_size: 100,
            parallel: 1,
            max_queue: 1,
            n_vocab: 10,
            threads: (0, 0),
        };
        let engine = Engine::start(Slow, None, limits, 8, None, None).expect("engine");
        let mut r = request(1);
        r.prompt = vec![1, -1];
        r.images = vec![Arc::new(ImageInput {
            start: 1,
            len: 1,
            digest: "d".into(),
            width: 1,
            height: 1,
            rgb: vec![0; 3],
        })];
        assert!(
            matches!(engine.submit(r.clone()), Err(SubmitError::Invalid(m)) if m.contains("no vision projector"))
        );
        // a placeholder outside an image's span is no token
        r.images.clear();
        assert!(
            matches!(engine.submit(r), Err(SubmitError::Invalid(m)) if m.contains("outside the vocabulary"))
        );
    }

    #[test]
    fn a_cancelled_request_frees_its_place_at_once() {
        let limits = Limits {
            ctx_size: 1000,
            parallel: 1,
            max_queue: 1,
            n_vocab: 10,
            threads: (0, 0),
        };
        let engine = Engine::start(Slow, None, limits, 8, None, None).expect("engine");
        engine.submit(request(1)).expect("runs");
        engine.submit(request(2)).expect("waits");
        assert_eq!(engine.submit(request(3)), Err(SubmitError::QueueFull(1)));
        // the loop is inside a 20 ms step: the place must not wait for it
        engine.cancel(2);
        engine.submit(request(3)).expect("takes the place of 2");
        assert_eq!(engine.submit(request(4)), Err(SubmitError::QueueFull(1)));
        // once the loop has ended request 2, its finish does not free a second place
        let deadline = Instant::now() + Duration::from_secs(10);
        while !engine
            .poll()
            .iter()
            .any(|e| e.request == 2 && e.finish == Some(Finish::Cancelled))
        {
            assert!(Instant::now() < deadline, "request 2 never ended");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(engine.submit(request(4)), Err(SubmitError::QueueFull(1)));
    }

    #[test]
    fn events_sent_to_a_socket_arrive_there_in_order_until_close() {
        let limits = Limits {
            ctx_size: 1000,
            parallel: 2,
            max_queue: 0,
            n_vocab: 10,
            threads: (0, 0),
        };
        let (ours, theirs) = UnixDatagram::pair().expect("pair");
        let mut engine = Engine::start(Slow, None, limits, 8, None, None).expect("engine");
        engine.send_to(theirs);
        engine.submit(request(1)).expect("runs");
        let mut buf = vec![0u8; wire::PACKET];
        let n = ours.recv(&mut buf).expect("a packet");
        let first = wire::decode(&buf[..n]).expect("events");
        assert_eq!((first[0].request, first[0].text.as_str()), (1, "x"));
        engine.close();
        let mut last = None;
        ours.set_nonblocking(true).expect("nonblocking");
        while let Ok(n) = ours.recv(&mut buf) {
            last = wire::decode(&buf[..n]).expect("events").pop();
        }
        assert_eq!(last.and_then(|e| e.finish), Some(Finish::Cancelled));
        assert!(engine.poll().is_empty());
    }
}

//! The engine: a batcher on its own thread, fed through a command queue, reporting events.
//!
//! Callers (the Python binding) never wait for the decode loop: `submit` and `cancel` enqueue
//! and return, and the loop wakes its reader through a socket after each step that produced
//! events, so one `poll()` collects everything every sequence produced. In a runner process
//! the loop sends its events to the server itself instead (`send_to`, `wire`).

pub mod backend;
pub mod batcher;
pub mod types;
pub mod wire;

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use batcher::{Backend, Batcher, Counters};
use types::{Event, Finish, Request};

enum Command {
    Submit(Request, Instant),
    Cancel(u64),
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
}

pub struct Limits {
    pub ctx_size: usize,
    pub parallel: usize,
    pub max_queue: usize,
    pub n_vocab: i32,
}

pub struct Engine {
    shared: Arc<Shared>,
    limits: Limits,
    thread: Option<JoinHandle<()>>,
    reader: UnixStream,
}

impl Engine {
    pub fn start<B>(backend: B, limits: Limits, batch_size: usize) -> std::io::Result<Self>
    where
        B: Backend + Send + 'static,
        B::Sampler: Send,
    {
        let (reader, writer) = UnixStream::pair()?;
        reader.set_nonblocking(true)?;
        writer.set_nonblocking(true)?;
        let shared = Arc::new(Shared::default());
        let batcher = Batcher::new(backend, limits.parallel, limits.ctx_size, batch_size);
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("xllm-batch".into())
            .spawn(move || run(batcher, &thread_shared, writer))?;
        Ok(Self {
            shared,
            limits,
            thread: Some(thread),
            reader,
        })
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
        self.check_tokens(&request.prompt)
            .map_err(SubmitError::Invalid)?;
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
        commands.push_back(Command::Submit(request, Instant::now()));
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

    /// Stop the loop: waiting and running requests end as cancelled.
    pub fn close(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
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

fn run<B: Backend>(mut batcher: Batcher<B>, shared: &Shared, mut notify: UnixStream) {
    let mut events = Vec::new();
    loop {
        let commands: Vec<Command> = {
            let mut queue = shared.commands.lock().expect("poisoned");
            while queue.is_empty() && batcher.is_idle() && !shared.stop.load(Ordering::SeqCst) {
                queue = shared.wake.wait(queue).expect("poisoned");
            }
            queue.drain(..).collect()
        };
        let stopping = shared.stop.load(Ordering::SeqCst);
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            for command in commands {
                match command {
                    Command::Submit(request, at) => batcher.submit(request, at),
                    Command::Cancel(id) => batcher.cancel(id, &mut events),
                }
            }
            if stopping {
                batcher.fail_all(Finish::Cancelled, &mut events);
            } else {
                batcher.step(Instant::now(), &mut events);
            }
        }));
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
        }
        {
            let mut outstanding = shared.outstanding.lock().expect("poisoned");
            for e in events.iter().filter(|e| e.finish.is_some()) {
                if let Some(left) = outstanding.get_mut(&e.request) {
                    *left -= 1;
                    if *left == 0 {
                        outstanding.remove(&e.request);
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
    use super::types::{Params, TokenLogprob};
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
        }
    }

    #[test]
    fn a_cancelled_request_frees_its_place_at_once() {
        let limits = Limits {
            ctx_size: 1000,
            parallel: 1,
            max_queue: 1,
            n_vocab: 10,
        };
        let engine = Engine::start(Slow, limits, 8).expect("engine");
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
        };
        let (ours, theirs) = UnixDatagram::pair().expect("pair");
        let mut engine = Engine::start(Slow, limits, 8).expect("engine");
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

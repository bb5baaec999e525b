//! Sequences' KV state on disk, so the next turn of a conversation skips its prefill even after
//! the model was unloaded or the server restarted.
//!
//! A sequence that finished normally is saved as one file: its tokens and libllama's state of
//! it. A new prompt that starts with a saved sequence's tokens restores that state and prefills
//! only the rest. The files are keyed by their tokens alone, so the directory must be the
//! model's (its digest and KV settings: the caller's business). A longer save of the same
//! conversation replaces the shorter one; disk use is bounded, least recently used first.
//! Files are written by a thread of their own (temporary file, then rename; mode 0600): the
//! decode loop only copies the state out, into the buffer of the last save written (new memory
//! of tens of MiB costs its first touch, page by page, several times the copy: 33 ms against
//! 5.5 for a 47 MB state here). A file that cannot be read whole is deleted.

use memmap2::{Mmap, MmapOptions};
use std::collections::hash_map::DefaultHasher;
use std::fs;
use std::hash::{Hash, Hasher};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

const MAGIC: &[u8; 8] = b"XLLMKV01";
const SUFFIX: &str = "kv";
/// Sequences shorter than this are not saved: their prefill is cheap, and each file costs a
/// write of tens of KiB a token.
pub const MIN_TOKENS: usize = 256;
/// States waiting for the writer, at most.
const QUEUED: usize = 2;
/// A saved sequence is restored for a prompt sharing at least this many tokens with it.
const MIN_SHARED: usize = 64;

fn common_prefix(a: &[i32], b: &[i32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[derive(Debug, Clone)]
struct Entry {
    path: PathBuf,
    tokens: Arc<Vec<i32>>,
    bytes: u64,
    used: u64,
}

#[derive(Debug, Default)]
struct Index {
    entries: Vec<Entry>,
    clock: u64,
    max_bytes: u64,
}

impl Index {
    fn bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.bytes).sum()
    }

    /// Drop the least recently used files until the total fits.
    fn evict(&mut self) {
        while self.bytes() > self.max_bytes && !self.entries.is_empty() {
            let oldest = (0..self.entries.len())
                .min_by_key(|&i| self.entries[i].used)
                .expect("not empty");
            let e = self.entries.remove(oldest);
            let _ = fs::remove_file(&e.path);
        }
    }
}

/// Counters for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct DiskStats {
    pub saves: u64,
    pub restores: u64,
    pub restored_tokens: u64,
    pub bytes: u64,
}

struct Save {
    tokens: Vec<i32>,
    state: Vec<u8>,
}

/// One model's directory of saved sequences.
pub struct DiskCache {
    dir: PathBuf,
    index: Arc<Mutex<Index>>,
    stats: Arc<Mutex<DiskStats>>,
    writer: Option<SyncSender<Save>>,
    thread: Option<JoinHandle<()>>,
    /// A written (or dropped) save's state buffer, for the next save to copy into; the larger
    /// one is kept.
    spare: Arc<Mutex<Vec<u8>>>,
}

fn keep(spare: &Mutex<Vec<u8>>, buf: Vec<u8>) {
    let mut spare = spare.lock().expect("poisoned");
    if buf.capacity() > spare.capacity() {
        *spare = buf;
    }
}

fn name_of(tokens: &[i32]) -> String {
    let mut h = DefaultHasher::new();
    tokens.hash(&mut h);
    format!("{:016x}-{}.{SUFFIX}", h.finish(), tokens.len())
}

/// A file opened at its state, with its tokens and the state's length; None if it is not one
/// of ours, whole.
fn open_saved(path: &Path) -> Option<(fs::File, Vec<i32>, u64)> {
    let mut f = fs::File::open(path).ok()?;
    let size = f.metadata().ok()?.len();
    let mut head = [0u8; 12];
    f.read_exact(&mut head).ok()?;
    if &head[..8] != MAGIC {
        return None;
    }
    let n = u32::from_le_bytes(head[8..12].try_into().ok()?) as u64;
    let mut raw = vec![0u8; (n * 4) as usize];
    f.read_exact(&mut raw).ok()?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).ok()?;
    let state_len = u64::from_le_bytes(len);
    if n == 0 || state_len == 0 || 12 + n * 4 + 8 + state_len != size {
        return None; // truncated, or more than we wrote
    }
    let tokens = raw
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    Some((f, tokens, state_len))
}

/// A saved state, mapped from its file: libllama copies it from the page cache straight into
/// the KV cache, with no buffer of tens of MiB to fill first.
pub struct State(Mmap);

impl std::ops::Deref for State {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

/// The state in a file, if the file holds `tokens`' whole.
fn read_state(path: &Path, tokens: &[i32]) -> Option<State> {
    let (f, _, len) = open_saved(path).filter(|(_, t, _)| t == tokens)?;
    let offset = 12 + tokens.len() as u64 * 4 + 8;
    // SAFETY: files are written whole under another name and renamed into place, never changed
    // in place; one cut short by hand while mapped would fault (the size was checked above).
    let map = unsafe {
        MmapOptions::new()
            .offset(offset)
            .len(len as usize)
            .populate()
            .map(&f)
    };
    map.ok().map(State)
}

fn write_file(dir: &Path, save: &Save) -> std::io::Result<(PathBuf, u64)> {
    let path = dir.join(name_of(&save.tokens));
    let tmp = dir.join(format!(".{}.tmp", name_of(&save.tokens)));
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600); // the file holds the conversation, in derived form
    }
    let result = (|| {
        let mut f = std::io::BufWriter::new(options.open(&tmp)?);
        f.write_all(MAGIC)?;
        f.write_all(&(save.tokens.len() as u32).to_le_bytes())?;
        for t in &save.tokens {
            f.write_all(&t.to_le_bytes())?;
        }
        f.write_all(&(save.state.len() as u64).to_le_bytes())?;
        f.write_all(&save.state)?;
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        fs::rename(&tmp, &path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp); // a full disk leaves nothing half written
        return Err(e);
    }
    let bytes = 12 + save.tokens.len() as u64 * 4 + 8 + save.state.len() as u64;
    Ok((path, bytes))
}

impl DiskCache {
    /// The cache in `dir` (made if missing), holding at most `max_bytes`; the files already
    /// there are indexed and those that are not whole are deleted.
    pub fn open(dir: &Path, max_bytes: u64) -> std::io::Result<Self> {
        fs::create_dir_all(dir)?;
        let mut index = Index {
            max_bytes,
            ..Index::default()
        };
        for item in fs::read_dir(dir)? {
            let path = item?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with('.') && name.ends_with(".tmp") {
                let _ = fs::remove_file(&path); // a write cut short by a crash
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some(SUFFIX) {
                continue;
            }
            match open_saved(&path) {
                Some((f, tokens, _)) => {
                    let Ok(meta) = f.metadata() else {
                        continue;
                    };
                    let used = meta
                        .modified()
                        .ok()
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map_or(0, |d| d.as_secs());
                    let bytes = meta.len();
                    index.entries.push(Entry {
                        path,
                        tokens: Arc::new(tokens),
                        bytes,
                        used,
                    });
                }
                None => {
                    let _ = fs::remove_file(&path);
                }
            }
        }
        index.clock = index.entries.iter().map(|e| e.used).max().unwrap_or(0) + 1;
        index.evict();
        let stats = DiskStats {
            bytes: index.bytes(),
            ..DiskStats::default()
        };
        let index = Arc::new(Mutex::new(index));
        let stats = Arc::new(Mutex::new(stats));
        // a state is tens of MiB: while the disk is behind, further saves are dropped rather
        // than queued in memory
        let (writer, saves) = sync_channel::<Save>(QUEUED);
        let spare = Arc::new(Mutex::new(Vec::new()));
        let (w_dir, w_index, w_stats) = (dir.to_path_buf(), index.clone(), stats.clone());
        let w_spare = spare.clone();
        let thread = std::thread::Builder::new()
            .name("xllm-kv-writer".into())
            .spawn(move || {
                for save in saves {
                    let written = write_file(&w_dir, &save);
                    keep(&w_spare, save.state);
                    let Ok((path, bytes)) = written else {
                        continue; // a full or failing disk skips the save, nothing more
                    };
                    let mut index = w_index.lock().expect("poisoned");
                    let tokens = Arc::new(save.tokens);
                    // an earlier save of this conversation (a prefix of it) is replaced
                    index.entries.retain(|e| {
                        let stale = e.path != path
                            && e.tokens.len() <= tokens.len()
                            && tokens.starts_with(&e.tokens);
                        if stale {
                            let _ = fs::remove_file(&e.path);
                        }
                        !stale && e.path != path
                    });
                    index.clock += 1;
                    let used = index.clock;
                    index.entries.push(Entry {
                        path,
                        tokens,
                        bytes,
                        used,
                    });
                    index.evict();
                    let mut stats = w_stats.lock().expect("poisoned");
                    stats.saves += 1;
                    stats.bytes = index.bytes();
                }
            })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            index,
            stats,
            writer: Some(writer),
            thread: Some(thread),
            spare,
        })
    }

    pub fn stats(&self) -> DiskStats {
        *self.stats.lock().expect("poisoned")
    }

    /// A buffer for the next state to save (`save` takes it back): an earlier save's, or new.
    pub fn buffer(&self) -> Vec<u8> {
        std::mem::take(&mut *self.spare.lock().expect("poisoned"))
    }

    /// Queue a sequence's state for saving, unless it is short or already saved.
    pub fn save(&self, tokens: &[i32], state: Vec<u8>) {
        let unsaved = match &self.writer {
            Some(w) if !state.is_empty() && self.wants(tokens) => {
                let save = Save {
                    tokens: tokens.to_vec(),
                    state,
                };
                match w.try_send(save) {
                    Ok(()) => return, // the writer gives the buffer back
                    // the disk is behind: this one is dropped
                    Err(TrySendError::Full(save) | TrySendError::Disconnected(save)) => save.state,
                }
            }
            _ => state,
        };
        keep(&self.spare, unsaved);
    }

    /// Whether a sequence this long would be saved (the caller skips copying its state out
    /// otherwise).
    pub fn wants(&self, tokens: &[i32]) -> bool {
        tokens.len() >= MIN_TOKENS
            && !self
                .index
                .lock()
                .expect("poisoned")
                .entries
                .iter()
                .any(|e| e.tokens.as_slice() == tokens)
    }

    /// The saved sequence sharing the longest prefix with `prompt`, if that prefix is longer
    /// than `than` (and than `MIN_SHARED`): its tokens and state, and the length shared. A
    /// file that cannot be read is deleted.
    pub fn lookup(&self, prompt: &[i32], than: usize) -> Option<(Arc<Vec<i32>>, State, usize)> {
        let (path, tokens, shared) = {
            let mut index = self.index.lock().expect("poisoned");
            let (best, shared) = (0..index.entries.len())
                .map(|i| (i, common_prefix(&index.entries[i].tokens, prompt)))
                .filter(|&(_, n)| n > than && n >= MIN_SHARED)
                .max_by_key(|&(_, n)| n)?;
            index.clock += 1;
            let clock = index.clock;
            let e = &mut index.entries[best];
            e.used = clock;
            (e.path.clone(), e.tokens.clone(), shared)
        };
        let state = read_state(&path, &tokens);
        match state {
            Some(state) => Some((tokens, state, shared)),
            None => {
                self.forget(&path);
                None
            }
        }
    }

    /// Count a restore of `n` tokens.
    pub fn restored(&self, n: usize) {
        let mut stats = self.stats.lock().expect("poisoned");
        stats.restores += 1;
        stats.restored_tokens += n as u64;
    }

    /// Delete a file libllama could not take (or that could not be read).
    pub fn forget(&self, path: &Path) {
        let mut index = self.index.lock().expect("poisoned");
        index.entries.retain(|e| e.path != path);
        let _ = fs::remove_file(path);
        self.stats.lock().expect("poisoned").bytes = index.bytes();
    }

    /// The file of a saved sequence.
    pub fn path_of(&self, tokens: &[i32]) -> PathBuf {
        self.dir.join(name_of(tokens))
    }

    /// Wait until every queued save is written (tests, and a clean shutdown).
    pub fn flush(&mut self) {
        self.writer.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for DiskCache {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(n: usize, base: i32) -> Vec<i32> {
        (0..n as i32).map(|i| base + i).collect()
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("xllm-kv-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn the_longest_saved_prefix_is_found_and_a_longer_save_replaces_a_shorter() {
        let d = dir("prefix");
        let mut c = DiskCache::open(&d, 1 << 30).unwrap();
        let turn1 = seq(300, 0);
        let turn2 = seq(500, 0);
        c.save(&turn1, vec![1; 1000]);
        c.flush();
        let c = DiskCache::open(&d, 1 << 30).unwrap(); // as after a restart
        let (tokens, state, shared) = c.lookup(&seq(400, 0), 0).unwrap();
        assert_eq!(
            (tokens.len(), &state[..], shared),
            (300, &vec![1; 1000][..], 300)
        );
        assert!(c.lookup(&seq(400, 0), 300).is_none()); // not longer than what is cached
        assert_eq!(c.lookup(&seq(200, 0), 0).unwrap().2, 200); // a prompt it goes on past
        let mut other = seq(300, 0);
        other[100] = -5;
        assert_eq!(c.lookup(&other, 0).unwrap().2, 100); // shared up to where they differ
        other[10] = -5;
        assert!(c.lookup(&other, 0).is_none()); // too little in common
        assert!(c.lookup(&seq(400, 7), 0).is_none()); // another conversation
        let mut c = c;
        c.save(&turn2, vec![2; 1000]);
        c.flush();
        let c = DiskCache::open(&d, 1 << 30).unwrap();
        assert_eq!(c.lookup(&seq(600, 0), 0).unwrap().0.len(), 500);
        let files = fs::read_dir(&d).unwrap().count();
        assert_eq!(files, 1, "the shorter save was replaced");
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_saved_states_memory_is_the_next_saves_buffer() {
        let d = dir("spare");
        let mut c = DiskCache::open(&d, 1 << 30).unwrap();
        assert_eq!(c.buffer().capacity(), 0); // nothing saved yet: a new one
        let state = vec![3u8; 4000];
        let memory = state.as_ptr();
        c.save(&seq(300, 0), state);
        c.flush(); // written
        let buf = c.buffer();
        assert_eq!((buf.as_ptr(), buf.len()), (memory, 4000)); // the same memory, not a copy
        assert_eq!(c.buffer().capacity(), 0, "handed out once");
        // one that is not saved (too short) is kept too, and the larger of two stays
        c.save(&seq(10, 0), vec![0; 100]);
        c.save(&seq(10, 0), buf);
        c.save(&seq(10, 0), vec![0; 10]);
        let kept = c.buffer();
        assert_eq!(kept.as_ptr(), memory);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn short_sequences_are_not_saved() {
        let d = dir("short");
        let mut c = DiskCache::open(&d, 1 << 30).unwrap();
        assert!(!c.wants(&seq(MIN_TOKENS - 1, 0)));
        c.save(&seq(MIN_TOKENS - 1, 0), vec![1; 10]);
        c.flush();
        assert_eq!(fs::read_dir(&d).unwrap().count(), 0);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn disk_use_stays_under_the_bound_dropping_the_least_recent() {
        let d = dir("bound");
        let size = 12 + 300 * 4 + 8 + 10_000;
        let mut c = DiskCache::open(&d, (size * 2) as u64).unwrap();
        c.save(&seq(300, 0), vec![1; 10_000]);
        c.save(&seq(300, 1000), vec![1; 10_000]);
        c.flush();
        let mut c = DiskCache::open(&d, (size * 2) as u64).unwrap();
        assert!(c.lookup(&seq(301, 0), 0).is_some()); // used: the other one is older now
        c.save(&seq(300, 2000), vec![1; 10_000]);
        c.flush();
        let c = DiskCache::open(&d, (size * 2) as u64).unwrap();
        assert!(c.stats().bytes <= (size * 2) as u64);
        assert!(c.lookup(&seq(301, 0), 0).is_some());
        assert!(c.lookup(&seq(301, 2000), 0).is_some());
        assert!(c.lookup(&seq(301, 1000), 0).is_none());
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn truncated_and_foreign_files_are_deleted() {
        let d = dir("corrupt");
        let mut c = DiskCache::open(&d, 1 << 30).unwrap();
        c.save(&seq(300, 0), vec![1; 1000]);
        c.flush();
        let path = c.path_of(&seq(300, 0));
        let data = fs::read(&path).unwrap();
        fs::write(&path, &data[..data.len() - 10]).unwrap();
        fs::write(d.join("other.kv"), b"not ours").unwrap();
        let c = DiskCache::open(&d, 1 << 30).unwrap();
        assert!(c.lookup(&seq(400, 0), 0).is_none());
        assert_eq!(fs::read_dir(&d).unwrap().count(), 0);
        // truncated after indexing: the lookup finds out and deletes it
        let mut c = c;
        c.save(&seq(300, 0), vec![1; 1000]);
        c.flush();
        let c = DiskCache::open(&d, 1 << 30).unwrap();
        fs::write(&path, &data[..data.len() - 10]).unwrap();
        assert!(c.lookup(&seq(400, 0), 0).is_none());
        assert!(!path.exists());
        let _ = fs::remove_dir_all(&d);
    }

    #[cfg(unix)]
    #[test]
    fn files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let d = dir("mode");
        let mut c = DiskCache::open(&d, 1 << 30).unwrap();
        c.save(&seq(300, 0), vec![1; 100]);
        c.flush();
        let mode = fs::metadata(c.path_of(&seq(300, 0)))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let _ = fs::remove_dir_all(&d);
    }
}

//! argon2id for one-time codes, on a few dedicated threads behind a bounded queue.
//!
//! `workers` threads (one per core by default) run the hashes; at most `queue` more wait. Each
//! thread owns its argon2 memory (19 MiB by default), allocated once and reused for every hash
//! (`hash_password_into_with_memory`) and zeroed after each, instead of asking the allocator for
//! 19 MiB per hash: glibc raises its mmap threshold after the first such free, and from then on
//! serves these blocks from arenas that are never given back (the process grew to ~900 MB).
//! Past that the caller gets `Busy` at once (answered 503 with Retry-After), so a flood of
//! verifications never stalls the rest of the service.

use std::sync::Arc;

use argon2::{Algorithm, Argon2, Block, Params, PasswordHash, Version};
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;
use zeroize::Zeroizing;

use crate::config::Argon2Settings;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HashError {
    #[error("too many code checks are waiting")]
    Busy,
    #[error("argon2: {0}")]
    Internal(String),
}

/// A place in the argon2 queue (released on drop).
pub struct Admission(#[allow(dead_code)] tokio::sync::OwnedSemaphorePermit);

impl Drop for Admission {
    fn drop(&mut self) {
        metrics::gauge!(crate::telemetry::ARGON2_ADMITTED).decrement(1.0);
    }
}

#[derive(Clone)]
pub struct CodeHasher {
    params: Params,
    /// Permits for running or waiting work (workers + queue).
    admission: Arc<Semaphore>,
    /// Work for the argon2 threads.
    jobs: std::sync::mpsc::Sender<Job>,
}

/// A job gets the thread's argon2 memory.
type Job = Box<dyn FnOnce(&mut Vec<Block>) + Send>;

/// The largest argon2 memory a stored hash may ask for (1 GiB); larger is refused, not allocated.
const MAX_MEMORY_BLOCKS: usize = 1 << 20;

/// Starts `n` threads that run jobs until every sender is gone.
fn start_workers(n: usize) -> Result<std::sync::mpsc::Sender<Job>, String> {
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    let rx = Arc::new(std::sync::Mutex::new(rx));
    for i in 0..n {
        let rx = rx.clone();
        std::thread::Builder::new()
            .name(format!("argon2-{i}"))
            .spawn(move || {
                let mut memory: Vec<Block> = Vec::new();
                loop {
                    let job = match rx.lock() {
                        Ok(r) => r.recv(),
                        Err(_) => return,
                    };
                    match job {
                        Ok(job) => {
                            let start = std::time::Instant::now();
                            job(&mut memory);
                            metrics::histogram!(crate::telemetry::ARGON2_HASH).record(start.elapsed().as_secs_f64());
                            memory.fill(Block::default());
                        }
                        Err(_) => return,
                    }
                }
            })
            .map_err(|e| format!("cannot start argon2 threads: {e}"))?;
    }
    Ok(tx)
}

impl CodeHasher {
    pub fn new(settings: Argon2Settings, workers: usize, queue: usize) -> Result<Self, String> {
        let params = Params::new(settings.memory_kib, settings.iterations, settings.parallelism, None)
            .map_err(|e| format!("invalid argon2 parameters: {e}"))?;
        let workers = workers.max(1);
        Ok(Self { params, admission: Arc::new(Semaphore::new(workers + queue)), jobs: start_workers(workers)? })
    }

    fn argon(params: &Params) -> Argon2<'static> {
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone())
    }

    /// A place in the queue, taken before any work that must not be wasted on a refusal (an MFA
    /// attempt is reserved only once the check is sure to run).
    pub fn admit(&self) -> Result<Admission, HashError> {
        match self.admission.clone().try_acquire_owned() {
            Ok(permit) => {
                metrics::gauge!(crate::telemetry::ARGON2_ADMITTED).increment(1.0);
                Ok(Admission(permit))
            }
            Err(_) => {
                metrics::counter!(crate::telemetry::ARGON2_REJECTIONS).increment(1);
                Err(HashError::Busy)
            }
        }
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(Params, &mut Vec<Block>) -> Result<T, HashError> + Send + 'static,
    ) -> Result<T, HashError> {
        let admitted = self.admit()?;
        self.run_admitted(admitted, f).await
    }

    async fn run_admitted<T: Send + 'static>(
        &self,
        _admitted: Admission,
        f: impl FnOnce(Params, &mut Vec<Block>) -> Result<T, HashError> + Send + 'static,
    ) -> Result<T, HashError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let params = self.params.clone();
        self.jobs
            .send(Box::new(move |memory: &mut Vec<Block>| {
                let _ = tx.send(f(params, memory));
            }))
            .map_err(|_| HashError::Internal("the argon2 threads stopped".into()))?;
        rx.await.map_err(|_| HashError::Internal("an argon2 job was lost".into()))?
    }

    /// The PHC string (`$argon2id$v=19$m=...`) of a code, with a random 128-bit salt.
    pub async fn hash(&self, code: Zeroizing<String>) -> Result<String, HashError> {
        self.run(move |params, memory| {
            let salt: [u8; 16] = rand::random();
            let mut out = [0u8; Params::DEFAULT_OUTPUT_LEN];
            let argon = Self::argon(&params);
            hash_into(&argon, &params, code.as_bytes(), &salt, &mut out, memory)?;
            let phc = PasswordHash {
                algorithm: Algorithm::Argon2id.ident(),
                version: Some(Version::V0x13.into()),
                params: (&params).try_into().map_err(internal)?,
                salt: Some(argon2::password_hash::phc::Salt::new(&salt).map_err(internal)?),
                hash: Some(argon2::password_hash::phc::Output::new(&out).map_err(internal)?),
            };
            Ok(phc.to_string())
        })
        .await
    }

    /// Constant-time check of a code against a stored PHC string (its own parameters apply).
    pub async fn verify(&self, code: Zeroizing<String>, phc: String) -> Result<bool, HashError> {
        let admitted = self.admit()?;
        self.verify_admitted(admitted, code, phc).await
    }

    /// [`verify`](Self::verify) with a place already taken by [`admit`](Self::admit).
    pub async fn verify_admitted(
        &self,
        admitted: Admission,
        code: Zeroizing<String>,
        phc: String,
    ) -> Result<bool, HashError> {
        self.run_admitted(admitted, move |_, memory| Ok(verify_with_memory(code.as_bytes(), &phc, memory))).await
    }
}

fn internal(e: impl std::fmt::Display) -> HashError {
    HashError::Internal(e.to_string())
}

/// argon2 of `pwd` into `out`, in `memory` (grown to the parameters' block count if needed).
fn hash_into(
    argon: &Argon2<'_>,
    params: &Params,
    pwd: &[u8],
    salt: &[u8],
    out: &mut [u8],
    memory: &mut Vec<Block>,
) -> Result<(), HashError> {
    let blocks = params.block_count();
    if blocks > MAX_MEMORY_BLOCKS {
        return Err(HashError::Internal(format!("argon2 memory of {blocks} KiB is over the limit")));
    }
    if memory.len() < blocks {
        memory.resize(blocks, Block::default());
    }
    let region = memory.get_mut(..blocks).ok_or_else(|| HashError::Internal("argon2 memory".into()))?;
    argon.hash_password_into_with_memory(pwd, salt, out, region).map_err(internal)
}

/// Whether `code` matches the PHC string `phc` (its own algorithm, version and parameters),
/// compared in constant time. A malformed PHC string never matches.
fn verify_with_memory(code: &[u8], phc: &str, memory: &mut Vec<Block>) -> bool {
    let Ok(hash) = PasswordHash::new(phc) else { return false };
    let (Some(salt), Some(expected)) = (&hash.salt, &hash.hash) else { return false };
    let Ok(algorithm) = Algorithm::try_from(hash.algorithm.as_str()) else { return false };
    let Ok(version) = hash.version.map_or(Ok(Version::default()), Version::try_from) else { return false };
    let Ok(params) = Params::try_from(&hash) else { return false };
    let argon = Argon2::new(algorithm, version, params.clone());
    let mut out = Zeroizing::new(vec![0u8; expected.len()]);
    hash_into(&argon, &params, code, salt.as_ref(), &mut out, memory).is_ok()
        && bool::from(out.as_slice().ct_eq(expected.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cheap() -> Argon2Settings {
        Argon2Settings { memory_kib: 64, iterations: 1, parallelism: 1 }
    }

    #[tokio::test]
    async fn hash_then_verify() {
        let h = CodeHasher::new(cheap(), 1, 4).unwrap();
        let phc = h.hash(Zeroizing::new("123456".into())).await.unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=64,t=1,p=1$"));
        assert!(!phc.contains("123456"));
        assert!(h.verify(Zeroizing::new("123456".into()), phc.clone()).await.unwrap());
        assert!(!h.verify(Zeroizing::new("654321".into()), phc.clone()).await.unwrap());
        assert!(!h.verify(Zeroizing::new("123456".into()), "not a hash".into()).await.unwrap());
    }

    /// Hashes are standard PHC strings: argon2's own verifier accepts ours, and ours accepts
    /// hashes made by argon2's own hasher (stored before this change) and with other parameters
    /// than the configured ones, in memory reused across sizes.
    #[tokio::test]
    async fn hashes_interoperate_with_the_argon2_crate_across_parameters() {
        use argon2::{PasswordHasher, PasswordVerifier};
        let h = CodeHasher::new(cheap(), 1, 4).unwrap();
        let ours = h.hash(Zeroizing::new("424242".into())).await.unwrap();
        let reference = Argon2::new(Algorithm::Argon2id, Version::V0x13, Params::new(64, 1, 1, None).unwrap());
        assert!(reference.verify_password(b"424242", ours.as_str()).is_ok());
        assert!(reference.verify_password(b"424243", ours.as_str()).is_err());
        for (m, t) in [(256, 2), (8, 1), (1024, 1)] {
            let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, Params::new(m, t, 1, None).unwrap());
            let theirs = argon.hash_password_with_salt(b"135790", b"saltsaltsaltsalt").unwrap().to_string();
            assert!(h.verify(Zeroizing::new("135790".into()), theirs.clone()).await.unwrap(), "m={m}");
            assert!(!h.verify(Zeroizing::new("135791".into()), theirs).await.unwrap(), "m={m}");
        }
        // Truncated, foreign-algorithm and absurd-memory hashes never match (and never allocate).
        let cut = &ours[..ours.len() - 4];
        assert!(!h.verify(Zeroizing::new("424242".into()), cut.to_string()).await.unwrap());
        let argon2i = ours.replacen("$argon2id$", "$argon2i$", 1);
        assert!(!h.verify(Zeroizing::new("424242".into()), argon2i).await.unwrap());
        let huge = ours.replacen("m=64,", "m=4194304,", 1);
        assert!(!h.verify(Zeroizing::new("424242".into()), huge).await.unwrap());
    }

    #[tokio::test]
    async fn a_full_queue_answers_busy_at_once() {
        let h = CodeHasher::new(Argon2Settings::default(), 1, 0).unwrap();
        let h2 = h.clone();
        let first = tokio::spawn(async move { h2.hash(Zeroizing::new("1234".into())).await });
        tokio::task::yield_now().await;
        // With one worker and no queue, a second request while the first runs is refused.
        let mut saw_busy = false;
        for _ in 0..50 {
            if h.hash(Zeroizing::new("5678".into())).await == Err(HashError::Busy) {
                saw_busy = true;
                break;
            }
        }
        assert!(first.await.unwrap().is_ok());
        assert!(saw_busy);
    }
}

//! argon2id for one-time codes, on a few dedicated threads behind a bounded queue.
//!
//! `workers` threads (one per core by default) run the hashes; at most `queue` more wait. The
//! threads are long-lived, so each reuses its 19 MiB of argon2 memory instead of leaving it in
//! the allocator arena of yet another blocking-pool thread (which grew the process to ~900 MB).
//! Past that the caller gets `Busy` at once (answered 503 with Retry-After), so a flood of
//! verifications never stalls the rest of the service.

use std::sync::Arc;

use argon2::{Algorithm, Argon2, Params, PasswordHasher, PasswordVerifier, Version};
use tokio::sync::Semaphore;
use zeroize::Zeroizing;

#[derive(Debug, Clone, Copy)]
pub struct Argon2Settings {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl Default for Argon2Settings {
    /// OWASP's minimum for argon2id: 19 MiB, 2 iterations, 1 lane.
    fn default() -> Self {
        Self { memory_kib: 19 * 1024, iterations: 2, parallelism: 1 }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HashError {
    #[error("too many code checks are waiting")]
    Busy,
    #[error("argon2: {0}")]
    Internal(String),
}

/// A place in the argon2 queue (released on drop).
pub struct Admission(#[allow(dead_code)] tokio::sync::OwnedSemaphorePermit);

#[derive(Clone)]
pub struct CodeHasher {
    params: Params,
    /// Permits for running or waiting work (workers + queue).
    admission: Arc<Semaphore>,
    /// Work for the argon2 threads.
    jobs: std::sync::mpsc::Sender<Job>,
}

type Job = Box<dyn FnOnce() + Send>;

/// Starts `n` threads that run jobs until every sender is gone.
fn start_workers(n: usize) -> Result<std::sync::mpsc::Sender<Job>, String> {
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    let rx = Arc::new(std::sync::Mutex::new(rx));
    for i in 0..n {
        let rx = rx.clone();
        std::thread::Builder::new()
            .name(format!("argon2-{i}"))
            .spawn(move || {
                loop {
                    let job = match rx.lock() {
                        Ok(r) => r.recv(),
                        Err(_) => return,
                    };
                    match job {
                        Ok(job) => job(),
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
        self.admission.clone().try_acquire_owned().map(Admission).map_err(|_| HashError::Busy)
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(Params) -> Result<T, HashError> + Send + 'static,
    ) -> Result<T, HashError> {
        let admitted = self.admit()?;
        self.run_admitted(admitted, f).await
    }

    async fn run_admitted<T: Send + 'static>(
        &self,
        _admitted: Admission,
        f: impl FnOnce(Params) -> Result<T, HashError> + Send + 'static,
    ) -> Result<T, HashError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let params = self.params.clone();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f(params));
            }))
            .map_err(|_| HashError::Internal("the argon2 threads stopped".into()))?;
        rx.await.map_err(|_| HashError::Internal("an argon2 job was lost".into()))?
    }

    /// The PHC string (`$argon2id$v=19$m=...`) of a code, with a random 128-bit salt.
    pub async fn hash(&self, code: Zeroizing<String>) -> Result<String, HashError> {
        self.run(move |params| {
            let salt: [u8; 16] = rand::random();
            Self::argon(&params)
                .hash_password_with_salt(code.as_bytes(), &salt)
                .map(|h| h.to_string())
                .map_err(|e| HashError::Internal(e.to_string()))
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
        self.run_admitted(admitted, move |params| {
            Ok(Self::argon(&params).verify_password(code.as_bytes(), phc.as_str()).is_ok())
        })
        .await
    }
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

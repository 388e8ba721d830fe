//! Run control: the shared run state, connecting the virtual users, driving them until the
//! run is over, and the open-loop dispatcher of due tickets.

use super::*;

pub(crate) struct Run {
    pub(crate) args: Args,
    pub(crate) mode: Mode,
    pub(crate) target: Target,
    pub(crate) auth: Option<HeaderValue>,
    pub(crate) prefix: String,
    pub(crate) timeout: Duration,
    /// Operations still allowed (`--requests`), or u64::MAX.
    pub(crate) budget: AtomicU64,
    /// Set when the duration is over (or on a hard stop).
    pub(crate) stop: AtomicBool,
    pub(crate) counter: AtomicUsize,
}

impl Run {
    /// Takes one operation from the budget; false when the run is over.
    pub(crate) fn take(&self) -> bool {
        if self.stop.load(Ordering::Relaxed) {
            return false;
        }
        self.budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok()
    }

    pub(crate) fn vu(&self, id: usize, recorder: &Arc<Recorder>) -> Vu {
        Vu {
            id,
            target: self.target.clone(),
            auth: self.auth.clone(),
            sender: None,
            timeout: self.timeout,
            recorder: recorder.clone(),
            reconnects: 0,
        }
    }

    pub(crate) fn user(&self, what: &str, n: usize) -> String {
        format!("{}-{what}{n}", self.prefix)
    }

    pub(crate) fn garth_body(&self, tag: &str) -> Bytes {
        let now = chrono::Utc::now().timestamp();
        let filler: String = std::iter::repeat_n('a', self.args.access_token_len.saturating_sub(tag.len())).collect();
        let body = json!({
            "kind": "garth",
            "oauth1_token": {"oauth_token": format!("o1tok-{tag}"), "oauth_token_secret": format!("o1sec-{tag}"),
                             "mfa_token": null, "mfa_expiration_timestamp": null, "domain": "garmin.com"},
            "oauth2_token": {"scope": "CONNECT_READ CONNECT_WRITE", "jti": format!("jti-{tag}"), "token_type": "Bearer",
                             "access_token": format!("acc-{tag}-{filler}"), "refresh_token": format!("ref-{tag}"),
                             "expires_in": 86_400, "expires_at": now + 86_400,
                             "refresh_token_expires_in": 2_592_000, "refresh_token_expires_at": now + 2_592_000}
        });
        Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
    }
}

pub(crate) fn log(msg: impl AsRef<str>) {
    eprintln!("[loadgen] {}", msg.as_ref());
}

/// Opens `n` VUs' connections, at most `parallelism` at a time. VUs that cannot connect are
/// kept (they retry on their first request) and counted.
pub(crate) async fn connect_all(run: &Arc<Run>, recorder: &Arc<Recorder>, n: usize) -> (Vec<Vu>, usize, Duration) {
    connect_to(run, recorder, &run.target, 0, n).await
}

/// `connect_all` to `target`, for VU ids `first..first + n`.
pub(crate) async fn connect_to(
    run: &Arc<Run>,
    recorder: &Arc<Recorder>,
    target: &Target,
    first: usize,
    n: usize,
) -> (Vec<Vu>, usize, Duration) {
    let start = Instant::now();
    let gate = Arc::new(Semaphore::new(run.args.connect_parallelism.max(1)));
    let mut tasks = Vec::with_capacity(n);
    for id in first..first + n {
        let mut vu = run.vu(id, recorder);
        vu.target = target.clone();
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await;
            let mut ok = false;
            for attempt in 0..5u32 {
                if vu.connect().await.is_ok() {
                    ok = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
            }
            vu.reconnects = 0;
            (vu, ok)
        }));
    }
    let mut vus = Vec::with_capacity(n);
    let mut failed = 0;
    for t in tasks {
        if let Ok((vu, ok)) = t.await {
            failed += usize::from(!ok);
            vus.push(vu);
        }
    }
    (vus, failed, start.elapsed())
}

/// Runs `work` on every VU until the run is over; each VU's total reconnect count is returned.
pub(crate) async fn drive<F, Fut>(run: &Arc<Run>, vus: Vec<Vu>, work: F) -> (Duration, u64, usize)
where
    F: Fn(Arc<Run>, Vu) -> Fut,
    Fut: std::future::Future<Output = Vu> + Send + 'static,
{
    let duration = run.args.duration.map(Duration::from_secs_f64);
    let ramp = run.args.ramp.map(Duration::from_secs_f64).unwrap_or_default();
    let n = vus.len().max(1);
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for vu in vus {
        let delay = ramp.mul_f64(vu.id as f64 / n as f64);
        let job = work(run.clone(), vu);
        set.spawn(async move {
            tokio::time::sleep(delay).await;
            job.await
        });
    }
    // Stop taking new work at the deadline; a hard stop aborts whatever is still running.
    let stopper = {
        let run = run.clone();
        tokio::spawn(async move {
            if let Some(d) = duration {
                tokio::time::sleep(d).await;
                run.stop.store(true, Ordering::Relaxed);
            }
        })
    };
    let hard =
        duration.unwrap_or(Duration::from_secs_f64(MAX_DURATION_SECS)) + run.timeout * 3 + Duration::from_secs(30);
    let mut reconnects = 0;
    let mut aborted = 0;
    let deadline = tokio::time::Instant::now() + hard;
    loop {
        match tokio::time::timeout_at(deadline, set.join_next()).await {
            Ok(Some(Ok(vu))) => reconnects += vu.reconnects,
            Ok(Some(Err(_))) => aborted += 1,
            Ok(None) => break,
            Err(_) => {
                run.stop.store(true, Ordering::Relaxed);
                aborted += set.len();
                set.abort_all();
                log(format!("hard stop: aborted {aborted} virtual users still running"));
                break;
            }
        }
    }
    stopper.abort();
    (start.elapsed(), reconnects, aborted)
}

/// Request number and its due time.
pub(crate) type Ticket = (usize, Option<Instant>);

/// Due tickets, shared by the VUs of an open-loop run.
#[derive(Clone)]
pub(crate) struct Tickets {
    pub(crate) rx: Arc<tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<Ticket>>>,
}

impl Tickets {
    pub(crate) async fn next(&self) -> Option<Ticket> {
        self.rx.lock().await.recv().await
    }
}

/// Issues ticket i at start + i/rate until the run is over (or `limit` tickets).
pub(crate) fn start_dispatcher(run: Arc<Run>, rate: f64, limit: usize) -> (Tickets, tokio::task::JoinHandle<u64>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let handle = tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        let mut max_lag_us = 0u64;
        for i in 0..limit {
            let due = start + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(due).await;
            if !run.take() {
                break;
            }
            max_lag_us = max_lag_us.max(due.elapsed().as_micros() as u64);
            if tx.send((i, Some(due.into_std()))).is_err() {
                break;
            }
        }
        max_lag_us
    });
    (Tickets { rx: Arc::new(tokio::sync::Mutex::new(rx)) }, handle)
}

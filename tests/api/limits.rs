//! Connection-level limits of the real HTTP server (`startup::serve`, as `serve` runs it): header
//! block size and count (431), body size (413 problem+json), slow clients (header read timeout),
//! graceful shutdown with idle and half-sent connections. Raw TCP, so nothing is smoothed over
//! by a client library.

use std::{
    net::SocketAddr,
    process::Stdio,
    time::{Duration, Instant},
};

use centraldb_mfa::{
    listener::LimitedListener,
    startup::{self, HttpLimits},
};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    sync::oneshot,
    task::JoinHandle,
};

use crate::helpers::*;

struct Served {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<std::io::Result<()>>,
    _app: TestApp,
}

impl Served {
    async fn start(limits: HttpLimits) -> Self {
        let app = TestApp::spawn().await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let server =
            tokio::spawn(startup::serve(LimitedListener::new(listener, 64), app.router.clone(), limits, async {
                let _ = stopped.await;
            }));
        Self { addr, stop: Some(stop), server, _app: app }
    }

    /// Stops the server; it must return within `within`.
    async fn shutdown(mut self, within: Duration) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(within, &mut self.server)
            .await
            .expect("the server did not shut down in time")
            .unwrap()
            .unwrap();
    }
}

/// Sends `request` on a new connection and reads the response until the server closes the
/// connection or `Connection: close` semantics end it: (status, headers+body text).
async fn exchange(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    // The server may answer (431) and close before it has read everything: a failed write
    // after that is fine, the answer is what counts.
    let _ = s.write_all(request).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text)
}

fn body_of(text: &str) -> &str {
    text.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

async fn healthz_ok(addr: SocketAddr) {
    let (status, text) = exchange(addr, b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status, 200, "{text}");
}

#[tokio::test]
async fn an_oversized_header_block_is_431_and_the_server_carries_on() {
    let served = Served::start(HttpLimits::default()).await;
    // One 64 KiB header.
    let big = "a".repeat(64 * 1024);
    let req = format!("GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: {big}\r\nConnection: close\r\n\r\n");
    let (status, text) = exchange(served.addr, req.as_bytes()).await;
    assert_eq!(status, 431, "{}", &text[..text.len().min(300)]);
    // Many small ones, together over the limit.
    let many: String = (0..40).map(|i| format!("X-H{i}: {}\r\n", "b".repeat(1000))).collect();
    let req = format!("GET /healthz HTTP/1.1\r\nHost: t\r\n{many}Connection: close\r\n\r\n");
    assert_eq!(exchange(served.addr, req.as_bytes()).await.0, 431);
    // Too many header fields.
    let count: String = (0..100).map(|i| format!("X-H{i}: v\r\n")).collect();
    let req = format!("GET /healthz HTTP/1.1\r\nHost: t\r\n{count}Connection: close\r\n\r\n");
    assert_eq!(exchange(served.addr, req.as_bytes()).await.0, 431);
    // A header block just inside the limit is served.
    let ok = "c".repeat(16 * 1024);
    let req = format!("GET /healthz HTTP/1.1\r\nHost: t\r\nX-Ok: {ok}\r\nConnection: close\r\n\r\n");
    let (status, text) = exchange(served.addr, req.as_bytes()).await;
    assert_eq!(status, 200, "{}", &text[..text.len().min(300)]);
    healthz_ok(served.addr).await;
    served.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn an_oversized_body_is_413_problem_json() {
    let served = Served::start(HttpLimits::default()).await;
    let auth = format!("Authorization: Bearer {ADMIN_KEY}\r\n");
    let big = format!("{{\"holder\": \"{}\"}}", "x".repeat(200 * 1024));
    for (path, chunked) in [
        ("/api/v1/users/u1/tokens/lease", false),
        ("/api/v1/users/u1/tokens/lease", true),
        ("/api/v1/sessions", false),
        ("/api/v1/users/u1/tokens/invalidate", false),
        ("/api/v1/users/u1/tokens/invalidate", true),
    ] {
        let req = if chunked {
            // No Content-Length: the limit applies while the body streams in.
            let mut r = format!(
                "POST {path} HTTP/1.1\r\nHost: t\r\n{auth}Content-Type: application/json\r\n\
                 Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            )
            .into_bytes();
            for chunk in big.as_bytes().chunks(8192) {
                r.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                r.extend_from_slice(chunk);
                r.extend_from_slice(b"\r\n");
            }
            r.extend_from_slice(b"0\r\n\r\n");
            r
        } else {
            format!(
                "POST {path} HTTP/1.1\r\nHost: t\r\n{auth}Content-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{big}",
                big.len()
            )
            .into_bytes()
        };
        let (status, text) = exchange(served.addr, &req).await;
        assert_eq!(status, 413, "{path} chunked={chunked}: {}", &text[..text.len().min(400)]);
        let lower = text.to_ascii_lowercase();
        assert!(lower.contains("content-type: application/problem+json"), "{path}: {text}");
        assert!(lower.contains("cache-control: no-store") && lower.contains("x-content-type-options: nosniff"));
        let problem: Value = serde_json::from_str(body_of(&text)).unwrap_or_else(|e| panic!("{path}: {e}: {text}"));
        assert_eq!(problem["code"], "payload_too_large", "{path}: {problem}");
        assert_eq!(problem["status"], 413);
    }
    healthz_ok(served.addr).await;
    served.shutdown(Duration::from_secs(5)).await;
}

/// Sends `GET /healthz` one byte at a time, `gap` apart, with headers that never end; returns how
/// long the server let that go on (it must close the connection).
async fn trickle(addr: SocketAddr, gap: Duration, give_up: Duration) -> Duration {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let start = Instant::now();
    let head = b"GET /healthz HTTP/1.1\r\nHost: t\r\n";
    let filler = b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut bytes = head.iter().chain(filler.iter().cycle());
    let mut buf = [0u8; 256];
    while start.elapsed() < give_up {
        let b = *bytes.next().unwrap();
        if s.write_all(&[b]).await.is_err() {
            return start.elapsed();
        }
        // The server closing shows as EOF (or a reset) on read.
        match tokio::time::timeout(gap, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return start.elapsed(),
            Ok(Ok(_)) => return start.elapsed(),
            Err(_) => {}
        }
    }
    panic!("a client trickling its headers was not cut off within {give_up:?}");
}

#[tokio::test]
async fn a_client_sending_headers_slowly_is_cut_off() {
    let limits = HttpLimits { header_read_timeout: Duration::from_secs(1), ..HttpLimits::default() };
    let served = Served::start(limits).await;
    let took = trickle(served.addr, Duration::from_millis(50), Duration::from_secs(10)).await;
    assert!(took >= Duration::from_millis(900), "cut off too early: {took:?}");
    assert!(took < Duration::from_secs(4), "cut off late: {took:?}");
    healthz_ok(served.addr).await;
    // A connection stuck half-way through its headers does not hold up the shutdown either.
    let mut stuck = TcpStream::connect(served.addr).await.unwrap();
    stuck.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n").await.unwrap();
    let mut idle = TcpStream::connect(served.addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
    let mut first = [0u8; 12];
    idle.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    served.shutdown(Duration::from_secs(4)).await;
}

#[tokio::test]
async fn shutdown_lets_a_request_in_flight_finish_and_closes_idle_connections() {
    let served = Served::start(HttpLimits::default()).await;
    // An idle keep-alive connection, after one request.
    let mut idle = TcpStream::connect(served.addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
    let mut first = [0u8; 12];
    idle.read_exact(&mut first).await.unwrap();
    // A long poll in flight: it is answered (304 once the notifier closes, or when its wait
    // ends), not cut off. It waits on a stored bundle (a wait on a missing one ends at once, 404).
    assert_eq!(served._app.put(&tokens_path("poller")).json(garth_body("p")).send().await.status, 201);
    let mut poll = TcpStream::connect(served.addr).await.unwrap();
    poll.write_all(
        format!(
            "GET /api/v1/users/poller/tokens?newer_than=1&wait_seconds=2 HTTP/1.1\r\nHost: t\r\n\
             Authorization: Bearer {ADMIN_KEY}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stopped = tokio::spawn(served.shutdown(Duration::from_secs(5)));
    let mut lines = BufReader::new(poll);
    let mut status = String::new();
    tokio::time::timeout(Duration::from_secs(5), lines.read_line(&mut status)).await.unwrap().unwrap();
    assert!(status.starts_with("HTTP/1.1 304"), "{status}");
    stopped.await.unwrap();
    // The idle connection was closed by the server.
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(2), idle.read_to_end(&mut rest)).await.unwrap().unwrap_or(0);
    assert!(n < 1000, "the idle connection got {n} more bytes");
}

/// The binary serves through the same limits: CENTRALDB_REQUEST_TIMEOUT_SECS bounds the header
/// read, a 64 KiB header gets 431, and it still stops on SIGTERM with a client stuck mid-headers.
#[tokio::test]
async fn the_binary_cuts_off_slow_clients_and_refuses_huge_headers() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_centraldb-mfa"))
        .arg("serve")
        .env_clear()
        .env("CENTRALDB_DATA_DIR", dir.path().join("data"))
        .env("CENTRALDB_LISTEN", "127.0.0.1:0")
        .env("CENTRALDB_LOG_FORMAT", "json")
        .env("CENTRALDB_REQUEST_TIMEOUT_SECS", "1")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(1);
    for stream in [
        Box::new(child.stderr.take().unwrap()) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
        Box::new(child.stdout.take().unwrap()),
    ] {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stream).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                append_binary_log(&line);
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && v["fields"]["message"] == "centraldb-mfa listening"
                {
                    let _ = tx.try_send(v["fields"]["addr"].as_str().unwrap_or_default().to_string());
                }
            }
        });
    }
    let addr: SocketAddr =
        tokio::time::timeout(Duration::from_secs(30), rx.recv()).await.unwrap().unwrap().parse().unwrap();
    secret(std::fs::read_to_string(dir.path().join("data").join("admin-api-key")).unwrap_or_default().trim());

    let took = trickle(addr, Duration::from_millis(50), Duration::from_secs(10)).await;
    assert!(took < Duration::from_secs(4), "cut off late: {took:?}");
    let big = "a".repeat(64 * 1024);
    let req = format!("GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: {big}\r\nConnection: close\r\n\r\n");
    assert_eq!(exchange(addr, req.as_bytes()).await.0, 431);
    healthz_ok(addr).await;

    let mut stuck = TcpStream::connect(addr).await.unwrap();
    stuck.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n").await.unwrap();
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "{status:?}");
}

/// A request body that sends its first bytes and then never finishes (nor fails).
struct NeverEnding(bool);

impl axum::body::HttpBody for NeverEnding {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        if self.0 {
            return std::task::Poll::Pending;
        }
        self.0 = true;
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(bytes::Bytes::from_static(b"{\"kind\": ")))))
    }
}

/// Issue 15 finding 9: `wait_seconds` anywhere in a query string extended the request timeout by
/// 30 s, so a slow-body PUT with `?wait_seconds=1` held its request for 40 s instead of 10. Only
/// the long-poll GET of a user's tokens (with `newer_than`) may wait longer, by its own wait.
#[tokio::test]
async fn wait_seconds_extends_only_the_long_poll() {
    use tower::ServiceExt;
    let app = TestApp::spawn_with(|v| {
        v.insert("CENTRALDB_REQUEST_TIMEOUT_SECS".into(), "1".into());
    })
    .await;
    let p = tokens_path("slow");
    for query in ["?wait_seconds=30", "?newer_than=0&wait_seconds=30"] {
        let req = axum::http::Request::builder()
            .method("PUT")
            .uri(format!("{p}{query}"))
            .header("authorization", format!("Bearer {ADMIN_KEY}"))
            .header("content-type", "application/json")
            .body(axum::body::Body::new(NeverEnding(false)))
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(10), app.router.clone().oneshot(req))
            .await
            .unwrap_or_else(|_| panic!("PUT {query}: not cut at the 1 s request timeout"))
            .unwrap();
        assert_eq!(resp.status(), 503, "PUT {query}");
    }
    app.get(&p).send().await.assert_problem(404, "tokens_not_found");
    // The long-poll still gets the wait it asked for on top of the timeout: 304 after 2 s, not 503.
    assert_eq!(app.put(&p).json(garth_body("slow")).send().await.status, 201);
    let started = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(10), app.get(&format!("{p}?newer_than=1&wait_seconds=2")).send())
        .await
        .unwrap();
    assert_eq!(r.status, 304, "{}", r.text);
    assert!(started.elapsed() >= Duration::from_secs(2));
}

//! One HTTP/1.1 keep-alive connection and the requests sent on it.

use super::*;

pub(crate) struct Resp {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

impl Resp {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    /// The version an `ETag: "<n>"` names.
    pub(crate) fn etag_version(&self) -> Option<i64> {
        let v = self.headers.get(header::ETAG)?.to_str().ok()?;
        v.trim().trim_matches('"').parse().ok()
    }
}

pub(crate) struct Vu {
    pub(crate) id: usize,
    pub(crate) target: Target,
    pub(crate) auth: Option<HeaderValue>,
    pub(crate) sender: Option<SendRequest<Full<Bytes>>>,
    pub(crate) timeout: Duration,
    pub(crate) recorder: Arc<Recorder>,
    pub(crate) reconnects: u64,
}

impl Vu {
    pub(crate) async fn connect(&mut self) -> Result<(), &'static str> {
        self.sender = None;
        let stream = tokio::time::timeout(self.timeout, TcpStream::connect(self.target.addr))
            .await
            .map_err(|_| "connect_timeout")?
            .map_err(|_| "connect")?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|_| "connect")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        self.sender = Some(sender);
        self.reconnects += 1;
        Ok(())
    }

    pub(crate) async fn ensure_connected(&mut self) -> Result<(), &'static str> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            self.connect().await?;
        }
        Ok(())
    }

    /// One request on this VU's connection; the connection is re-opened if the server closed it.
    pub(crate) async fn raw(
        &mut self,
        method: Method,
        path: &str,
        extra: &[(&'static str, String)],
        body: Option<Bytes>,
    ) -> Result<Resp, &'static str> {
        self.ensure_connected().await?;
        let mut b = Request::builder().method(method).uri(path).header(header::HOST, self.target.host.clone());
        if let Some(a) = &self.auth {
            b = b.header(header::AUTHORIZATION, a.clone());
        }
        if body.is_some() {
            b = b.header(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        for (k, v) in extra {
            b = b.header(*k, v.as_str());
        }
        let req = b.body(Full::new(body.unwrap_or_default())).map_err(|_| "request")?;
        let Some(sender) = self.sender.as_mut() else { return Err("connect") };
        let exchange = async {
            sender.ready().await.map_err(|_| "io")?;
            let resp = sender.send_request(req).await.map_err(|_| "io")?;
            let (parts, body) = resp.into_parts();
            let body = body.collect().await.map_err(|_| "io")?.to_bytes();
            Ok::<_, &'static str>(Resp { status: parts.status, headers: parts.headers, body })
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => {
                self.sender = None;
                Err(e)
            }
            Err(_) => {
                self.sender = None;
                Err("timeout")
            }
        }
    }

    /// A request, recorded under `route` with its latency measured from `since` (now when None).
    pub(crate) async fn call(
        &mut self,
        route: &'static str,
        method: Method,
        path: &str,
        extra: &[(&'static str, String)],
        body: Option<Bytes>,
        since: Option<Instant>,
    ) -> Result<Resp, Outcome> {
        let start = since.unwrap_or_else(Instant::now);
        let result = self.raw(method, path, extra, body).await;
        let elapsed = start.elapsed();
        match result {
            Ok(r) => {
                self.recorder.record(self.id, route, Outcome::Status(r.status.as_u16()), elapsed);
                Ok(r)
            }
            Err(kind) => {
                self.recorder.record(self.id, route, Outcome::Transport(kind), elapsed);
                Err(Outcome::Transport(kind))
            }
        }
    }
}

/// `Ok` when the answer has the expected status, else the outcome to blame.
pub(crate) fn want(r: Result<Resp, Outcome>, want: u16) -> Result<Resp, Outcome> {
    match r {
        Ok(r) if r.status.as_u16() == want => Ok(r),
        Ok(r) => Err(Outcome::Status(r.status.as_u16())),
        Err(e) => Err(e),
    }
}

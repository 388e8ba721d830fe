//! The target server (loopback only) and this process's limits and CPU time.

use super::*;

/// The server: a loopback socket address and the Host header to send.
#[derive(Clone)]
pub(crate) struct Target {
    pub(crate) addr: SocketAddr,
    pub(crate) host: HeaderValue,
}

pub(crate) fn parse_target(url: &str) -> Result<Target, String> {
    let uri: Uri = url.parse().map_err(|e| format!("--url {url:?} is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => return Err(format!("--url: scheme {other} is not supported (plain http on loopback only)")),
        None => return Err("--url must start with http://".into()),
    }
    let auth = uri.authority().ok_or("--url has no host")?;
    if auth.as_str().contains('@') {
        return Err("--url must not carry credentials".into());
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err("--url must be just scheme://host:port (no path or query)".into());
    }
    let host = auth.host();
    let port = auth.port_u16().unwrap_or(80);
    let ip: IpAddr = if host.eq_ignore_ascii_case("localhost") {
        // Deliberately not resolved: /etc/hosts could point "localhost" anywhere.
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| format!("--url host {host:?} refused: only 127.0.0.1/8, [::1] or localhost are allowed"))?
    };
    if !ip.is_loopback() {
        return Err(format!("--url host {ip} refused: this tool only targets loopback addresses"));
    }
    let host = HeaderValue::from_str(auth.as_str()).map_err(|_| "--url host is not a valid header value")?;
    Ok(Target { addr: SocketAddr::new(ip, port), host })
}

/// Raises RLIMIT_NOFILE's soft limit to the hard limit; returns the resulting soft limit.
pub(crate) fn raise_nofile_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    unsafe {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
        lim.rlim_cur
    }
}

/// CPU seconds (user, system) this process has used.
pub(crate) fn cpu_seconds() -> (f64, f64) {
    // SAFETY: getrusage fills the struct we pass.
    unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut u) != 0 {
            return (0.0, 0.0);
        }
        let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        (s(u.ru_utime), s(u.ru_stime))
    }
}

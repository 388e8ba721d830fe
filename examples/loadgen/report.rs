//! The JSON report and the table printed from it.

use super::*;

/// Microseconds as milliseconds (keeping microsecond resolution).
pub(crate) fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

pub(crate) fn latency_json(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!(null);
    }
    json!({
        "p50_ms": ms(h.value_at_quantile(0.50)), "p95_ms": ms(h.value_at_quantile(0.95)),
        "p99_ms": ms(h.value_at_quantile(0.99)), "max_ms": ms(h.max()), "mean_ms": ms(h.mean() as u64),
        "min_ms": ms(h.min()),
    })
}

pub(crate) fn is_error_status(s: u16) -> bool {
    s >= 400
}

pub(crate) fn route_json(route: &str, stats: &RouteStats, elapsed: f64) -> (Value, Histogram<u64>, u64, u64) {
    let mut all = new_hist();
    let mut statuses = serde_json::Map::new();
    let mut by_status = serde_json::Map::new();
    let mut errors = 0u64;
    for (s, h) in &stats.by_status {
        let _ = all.add(h);
        statuses.insert(s.to_string(), json!(h.len()));
        by_status.insert(s.to_string(), latency_json(h));
        if is_error_status(*s) {
            errors += h.len();
        }
    }
    let mut transport = serde_json::Map::new();
    for (k, h) in &stats.transport {
        let _ = all.add(h);
        transport.insert(k.to_string(), json!(h.len()));
        by_status.insert(k.to_string(), latency_json(h));
        errors += h.len();
    }
    let n = all.len();
    let v = json!({
        "route": route, "derived": is_derived(route), "requests": n, "errors": errors,
        "statuses": statuses, "transport_errors": transport,
        "throughput_rps": if elapsed > 0.0 { (n as f64 / elapsed * 10.0).round() / 10.0 } else { 0.0 },
        "latency": latency_json(&all), "latency_by_status": by_status,
    });
    (v, all, n, errors)
}

pub(crate) fn phase_json(recorder: &Recorder, elapsed: f64) -> Value {
    let merged = recorder.merged();
    let mut routes = Vec::new();
    let mut total = new_hist();
    let (mut total_n, mut total_err) = (0u64, 0u64);
    let mut statuses: BTreeMap<String, u64> = BTreeMap::new();
    // Real routes first, derived (flow, verification) last.
    let mut order: Vec<&&'static str> = merged.keys().collect();
    order.sort_by_key(|r| (rank(r), **r));
    for route in order {
        let stats = &merged[*route];
        let (v, all, n, errors) = route_json(route, stats, elapsed);
        if !is_derived(route) {
            let _ = total.add(&all);
            total_n += n;
            total_err += errors;
            for (s, c) in v["statuses"]
                .as_object()
                .into_iter()
                .flatten()
                .chain(v["transport_errors"].as_object().into_iter().flatten())
            {
                *statuses.entry(s.clone()).or_default() += c.as_u64().unwrap_or(0);
            }
        }
        routes.push(v);
    }
    json!({
        "elapsed_s": (elapsed * 1000.0).round() / 1000.0,
        "routes": routes,
        "total": {"requests": total_n, "errors": total_err, "statuses": statuses,
                  "throughput_rps": if elapsed > 0.0 { (total_n as f64 / elapsed * 10.0).round() / 10.0 } else { 0.0 },
                  "latency": latency_json(&total)},
    })
}

pub(crate) fn print_table(report: &Value) {
    let a = &report["args"];
    let opt = |v: &Value| if v.is_null() { "-".to_string() } else { v.to_string() };
    println!(
        "mode={} url={} connections={} duration_s={} requests={} rate={} users={} gets={}",
        report["mode"].as_str().unwrap_or(""),
        a["url"].as_str().unwrap_or(""),
        a["connections"],
        opt(&a["duration_s"]),
        opt(&a["requests"]),
        opt(&a["rate"]),
        a["users"],
        a["gets"]
    );
    if let Some(seed) = report.get("seed").filter(|s| !s.is_null()) {
        println!(
            "seed: {} requests, {} errors in {:.1}s",
            seed["total"]["requests"],
            seed["total"]["errors"],
            seed["elapsed_s"].as_f64().unwrap_or(0.0)
        );
    }
    let run = &report["run"];
    println!(
        "run: {:.2}s; connect: {} connections in {:.2}s ({} failed); reconnects during run: {}; client CPU {:.1}s user + {:.1}s sys",
        run["elapsed_s"].as_f64().unwrap_or(0.0),
        report["connect"]["connections"],
        report["connect"]["elapsed_s"].as_f64().unwrap_or(0.0),
        report["connect"]["failed"],
        report["reconnects"],
        report["client_cpu_s"]["user"].as_f64().unwrap_or(0.0),
        report["client_cpu_s"]["sys"].as_f64().unwrap_or(0.0),
    );
    if let Some(o) = report.get("open_flow").filter(|v| !v.is_null()) {
        println!(
            "open flow: {} users arrived at {}/s (max arrival lag {} ms); {} completed, {} failed, {} aborted; \
             peak in flight {}; think {} s; pool {} over {}",
            o["users"],
            o["arrival_rate"],
            o["max_arrival_lag_ms"],
            o["completed"],
            o["failed"],
            o["aborted"],
            o["peak_in_flight"],
            o["think_s"],
            o["pool"],
            o["servers"]
        );
    }
    if let Some(lag) = report.get("open_loop_max_dispatch_lag_ms").filter(|v| !v.is_null()) {
        println!("open loop: target {} req/s, max dispatch lag {} ms", a["rate"], lag);
    }
    println!(
        "{:<58} {:>9} {:>7} {:>10} {:>9} {:>9} {:>9} {:>9}",
        "route", "requests", "errors", "req/s", "p50 ms", "p95 ms", "p99 ms", "max ms"
    );
    let row = |name: &str, v: &Value| {
        let l = &v["latency"];
        let f = |k: &str| l[k].as_f64().map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into());
        println!(
            "{:<58} {:>9} {:>7} {:>10.1} {:>9} {:>9} {:>9} {:>9}",
            name,
            v["requests"].as_u64().unwrap_or(0),
            v["errors"].as_u64().unwrap_or(0),
            v["throughput_rps"].as_f64().unwrap_or(0.0),
            f("p50_ms"),
            f("p95_ms"),
            f("p99_ms"),
            f("max_ms")
        );
    };
    for r in run["routes"].as_array().into_iter().flatten() {
        row(r["route"].as_str().unwrap_or(""), r);
        let mut parts: Vec<String> = Vec::new();
        for (s, c) in r["statuses"].as_object().into_iter().flatten() {
            let p99 = r["latency_by_status"][s]["p99_ms"].as_f64().unwrap_or(0.0);
            parts.push(format!("{s}: {c} (p99 {p99:.3} ms)"));
        }
        for (s, c) in r["transport_errors"].as_object().into_iter().flatten() {
            parts.push(format!("{s}: {c}"));
        }
        println!("    {}", parts.join(", "));
    }
    row("TOTAL (excluding derived rows)", &run["total"]);
}

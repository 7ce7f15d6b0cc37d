//! Seeing a run, through the real binary: `safepipe report` opened in a real headless Chromium
//! (Debian's `chromium`, which `make setup` installs), and `safepipe status --watch` off a
//! terminal while a run is in progress.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Debian's Chromium, or the fix.
fn chromium() -> PathBuf {
    for candidate in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if Path::new(candidate).exists() {
            return candidate.into();
        }
    }
    panic!("no Chromium at /usr/bin/chromium: run `make setup` (it installs Debian's chromium package)");
}

/// One URL request of Chromium's network log: its URL and traffic annotation (which part of the
/// browser asked: the page's resource loader, or one of Chromium's own services).
#[derive(Debug)]
struct Request {
    url: String,
    annotation: Option<u64>,
}

/// Loads `page` headless (background services off) and returns the DOM after load, Chromium's
/// log (console messages included) and the URL requests of its network log.
fn open_in_chromium(page: &Path, scratch: &Path) -> (String, String, Vec<Request>) {
    let name = page.file_name().unwrap().to_string_lossy().to_string();
    let net_log = scratch.join(format!("{name}.net-log.json"));
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!("--user-data-dir={}", scratch.join("profile").display()))
        .arg(format!("--log-net-log={}", net_log.display()))
        .arg("--dump-dom")
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("start chromium");
    assert!(out.status.success(), "chromium failed: {}", text(&out.stderr));
    let log = std::fs::read_to_string(&net_log).unwrap_or_default();
    let mut requests = Vec::new();
    // The event parameters that name a URL are flat objects: `{..., "url": "..."}`.
    for object in log.split('{').map(|o| o.split('}').next().unwrap_or_default()) {
        let Some(at) = object.find("\"url\":\"") else {
            continue;
        };
        let url = &object[at + 7..];
        let url = url[..url.find('"').unwrap_or(url.len())].to_string();
        let annotation = object.split("\"traffic_annotation\":").nth(1).and_then(|a| {
            let digits: String = a.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        });
        requests.push(Request { url, annotation });
    }
    (text(&out.stdout), text(&out.stderr), requests)
}

/// `data-metric` key -> `data-value` of every number in the page.
fn metrics(dom: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for piece in dom.split("data-metric=\"").skip(1) {
        let key = piece[..piece.find('"').unwrap()].to_string();
        let value = piece.split("data-value=\"").nth(1).unwrap();
        let value: f64 = value[..value.find('"').unwrap()].parse().unwrap();
        out.insert(key, value);
    }
    out
}

/// `data-chart` name -> `data-total` of every chart.
fn charts(dom: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for piece in dom.split("data-chart=\"").skip(1) {
        let name = piece[..piece.find('"').unwrap()].to_string();
        let total = piece.split("data-total=\"").nth(1).unwrap();
        out.insert(name, total[..total.find('"').unwrap()].parse().unwrap());
    }
    out
}

#[test]
fn the_report_opens_offline_in_a_browser_with_the_counts_sql_gives_and_documents_as_text() {
    let ws = Workspace::new();
    // A document that tries to run a script and retitle the page; another with a control
    // sequence that would clear a terminal.
    std::fs::write(
        ws.path().join("hostile.jsonl"),
        "{\"id\":\"h1\",\"text\":\"Hello <script>document.title='pwned'</script><img src=x onerror=alert(1)> text\"}\n\
         {\"id\":\"h2\",\"text\":\"clear \\u001b[2J the screen, then go on for long enough\"}\n",
    )
    .unwrap();
    let extra = "[[inputs]]\nname = \"hostile\"\npaths = [\"hostile.jsonl\"]\n\n\
                 [train]\nmodel = \"tiny\"\ncheckpoint_dir = \"checkpoints\"\nsteps = 2\nmicro_batch = 1\n";
    let config = ws.config("config.toml", &token_config("run", extra));
    let cfg = config.to_str().unwrap();
    for args in [vec!["run", cfg], vec!["train", cfg]] {
        let out = safepipe(&args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    }
    // By default the report goes into the run directory.
    let out = safepipe(&["report", cfg]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let page = ws.path().join("run/report.html");
    assert!(
        text(&out.stdout).contains(&page.display().to_string()),
        "{}",
        text(&out.stdout)
    );

    // Chromium's own services (time sync, accounts) make requests of their own even with
    // background networking off; the page's requests go through the page's resource loader.
    // A control page with an external image tells which traffic annotation that is here.
    let control = ws.path().join("control.html");
    std::fs::write(
        &control,
        "<html><body><img src=\"http://example.invalid/x.png\"></body></html>",
    )
    .unwrap();
    let (_, _, seen) = open_in_chromium(&control, ws.path());
    let page_loader: Vec<u64> = seen
        .iter()
        .filter(|r| r.url.contains("example.invalid"))
        .filter_map(|r| r.annotation)
        .collect();
    assert!(
        !page_loader.is_empty(),
        "the network log shows no page request: {seen:?}"
    );

    let (dom, log, requests) = open_in_chromium(&page, ws.path());
    // Nothing ran, nothing was fetched, nothing complained.
    assert!(
        !dom.to_lowercase().contains("<script"),
        "a script element got into the page"
    );
    assert!(!dom.contains("<img"), "markup from a document became an element");
    assert!(
        dom.contains("<title>safepipe run report</title>"),
        "the page title changed"
    );
    assert!(
        dom.contains(
            "Hello &lt;script&gt;document.title='pwned'&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt; text"
        ),
        "the hostile document is not shown as text"
    );
    assert!(!dom.contains('\u{1b}'), "a control character reached the page");
    for line in log.lines() {
        assert!(
            !line.contains(":CONSOLE") && !line.contains("Uncaught") && !line.contains("Content Security Policy"),
            "console: {line}"
        );
    }
    for request in &requests {
        assert!(
            !request.annotation.is_some_and(|a| page_loader.contains(&a)),
            "the page made a request: {request:?}"
        );
    }
    assert!(dom.contains("Content-Security-Policy"), "the page lost its CSP");

    // The charts are there and draw what the tables count.
    let drawn = charts(&dom);
    for chart in [
        "stages",
        "routes",
        "kinds",
        "mixture",
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_second",
    ] {
        assert!(drawn.contains_key(chart), "no {chart} chart: {:?}", drawn.keys());
    }
    assert_eq!(
        drawn["routes"],
        sql_number(&config, "SELECT count(*) FROM routes") as f64
    );
    assert_eq!(
        drawn["stages"],
        sql_number(
            &config,
            "SELECT CAST(sum(rows_out + rows_dropped + rows_quarantined) AS BIGINT) FROM stats"
        ) as f64
    );
    assert_eq!(
        drawn["kinds"],
        sql_number(&config, "SELECT sum(n_tokens) FROM tokens") as f64
    );
    assert_eq!(drawn["loss"], 2.0, "two logged steps");

    // A sample of the numbers equals what `safepipe sql` says.
    let shown = metrics(&dom);
    for (key, query) in [
        (
            "stage.ingest.rows_in",
            "SELECT sum(rows_in) FROM stats WHERE stage = 'ingest'",
        ),
        (
            "stage.route.dropped",
            "SELECT sum(rows_dropped) FROM stats WHERE stage = 'route'",
        ),
        ("routes.keep", "SELECT count(*) FROM routes WHERE route = 'keep'"),
        ("routes.tag", "SELECT count(*) FROM routes WHERE route = 'tag'"),
        (
            "tokens.raw.tokens",
            "SELECT sum(n_tokens) FROM tokens WHERE kind = 'raw'",
        ),
        (
            "tokens.tagged.documents",
            "SELECT count(*) FROM tokens WHERE kind = 'tagged'",
        ),
        ("tokens.tag_tokens", "SELECT sum(tag_tokens) FROM tokens"),
        (
            "tag.harmbench.tags",
            "SELECT sum(tags_inserted) FROM tagged WHERE source = 'harmbench'",
        ),
        ("pack.sequences", "SELECT count(*) FROM shards"),
        ("pack.tokens", "SELECT sum(cardinality(input_ids)) FROM shards"),
        (
            "perf.tokenize.units",
            "SELECT count(*) FROM stats WHERE stage = 'tokenize'",
        ),
    ] {
        let value = shown.get(key).unwrap_or_else(|| panic!("no {key} in the report"));
        assert_eq!(*value, sql_number(&config, query) as f64, "{key} vs {query}");
    }
    assert_eq!(shown["train.last_step"], 2.0);
    assert_eq!(shown["tag.configured"], 0.2);
}

#[test]
fn status_watch_prints_a_line_per_refresh_while_a_run_goes_on_and_stops_when_done() {
    let ws = Workspace::new();
    let config = ws.config(
        "config.toml",
        &token_config("run", "[plan]\njsonl_unit_bytes = 65536\n\n[runner]\njobs = 1\n"),
    );
    let cfg = config.to_str().unwrap();
    // The watch starts first (no plan yet), then the run; off a terminal it prints one line per
    // refresh and exits once everything is committed.
    let watch = Command::new(bin())
        .args(["status", cfg, "--watch", "--interval", "0.2", "--until-done"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let run = safepipe(&["run", cfg]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let watched = watch.wait_with_output().unwrap();
    assert!(watched.status.success(), "{}", text(&watched.stderr));
    let lines: Vec<String> = text(&watched.stdout).lines().map(String::from).collect();
    assert!(!lines.is_empty());
    // Committed counts never go down, and the last line says all of them, done.
    let mut last = 0;
    let mut all = 0;
    for line in lines.iter().filter(|l| l.contains("stage-units committed")) {
        let figures = line.split(" stage-units committed").next().unwrap();
        let figures = figures.rsplit(' ').next().unwrap();
        let (done, total) = figures.split_once('/').unwrap();
        let (done, total): (usize, usize) = (done.parse().unwrap(), total.parse().unwrap());
        assert!(done >= last, "committed went down: {lines:?}");
        (last, all) = (done, total);
    }
    assert!(all > 0 && last == all, "{lines:?}");
    let end = lines.last().unwrap();
    assert!(
        end.contains("done") && end.contains("ingest") && end.contains("pack 1/1"),
        "{end}"
    );
    for line in &lines {
        assert!(
            line.contains("stage-units committed") || line.contains("no work plan yet"),
            "{line}"
        );
        assert!(
            !line.contains('\u{1b}'),
            "no terminal controls off a terminal: {line:?}"
        );
    }
}

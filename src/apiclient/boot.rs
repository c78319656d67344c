//! `apiclient boot [--svg FILE]`: this boot's timeline from `GET /boot`: the phases of both
//! stages and each service's start and ready times, all in milliseconds since the kernel
//! started. Without options a table, longest first (like `systemd-analyze blame`); with
//! `--svg FILE` a drawing of it on a time axis (like `systemd-analyze plot`), written to FILE
//! (`-` for stdout).

use serde_json::Value;

use super::{usage, Client, Error, Result};

/// One bar of the timeline.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    pub label: String,
    /// "stage1", "stage2" or "service" (the bar's colour).
    pub kind: &'static str,
    pub start_ms: f64,
    /// None: a service started but not ready (yet).
    pub end_ms: Option<f64>,
}

/// The spans in a `GET /boot` answer, in the order they began.
pub fn spans(boot: &Value) -> Vec<Span> {
    let mut out = Vec::new();
    for p in boot["phases"].as_array().into_iter().flatten() {
        let (Some(start), Some(us)) = (p["start-ms"].as_f64(), p["duration-us"].as_f64()) else { continue };
        let stage = p["stage"].as_u64().unwrap_or(0);
        out.push(Span {
            label: format!("stage {stage}: {}", p["name"].as_str().unwrap_or("?")),
            kind: if stage == 1 { "stage1" } else { "stage2" },
            start_ms: start,
            end_ms: Some(start + us / 1000.0),
        });
    }
    for s in boot["services"].as_array().into_iter().flatten() {
        let Some(start) = s["start-ms"].as_f64() else { continue };
        out.push(Span {
            label: format!("service {}", s["name"].as_str().unwrap_or("?")),
            kind: "service",
            start_ms: start,
            end_ms: s["ready-ms"].as_f64(),
        });
    }
    out.sort_by(|a, b| a.start_ms.total_cmp(&b.start_ms));
    out
}

/// The blame table: longest first; services that are not ready last.
pub fn table(spans: &[Span]) -> String {
    let mut rows: Vec<&Span> = spans.iter().collect();
    let dur = |s: &Span| s.end_ms.map(|e| e - s.start_ms);
    rows.sort_by(|a, b| match (dur(a), dur(b)) {
        (Some(x), Some(y)) => y.total_cmp(&x),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => a.start_ms.total_cmp(&b.start_ms),
    });
    let mut out = format!("{:>10} {:>10} {:>10}  {}\n", "took (ms)", "from (ms)", "to (ms)", "what");
    for s in rows {
        let (took, to) = match s.end_ms {
            Some(e) => (format!("{:.1}", e - s.start_ms), format!("{e:.0}")),
            None => ("not ready".into(), "-".into()),
        };
        out.push_str(&format!("{took:>10} {:>10.0} {to:>10}  {}\n", s.start_ms, s.label));
    }
    out
}

fn escape(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '&' => "&amp;".into(),
            '<' => "&lt;".into(),
            '>' => "&gt;".into(),
            '"' => "&quot;".into(),
            '\'' => "&apos;".into(),
            c if (c as u32) < 0x20 => " ".into(),
            c => c.to_string(),
        })
        .collect()
}

/// A step for the time axis' ticks: about 8 of them over `span` ms.
fn tick_step(span: f64) -> f64 {
    let raw = (span / 8.0).max(1.0);
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag)
}

const LABEL_W: f64 = 260.0;
const PLOT_W: f64 = 900.0;
const ROW_H: f64 = 18.0;

/// The timeline drawn as a standalone SVG document.
pub fn svg(title: &str, spans: &[Span]) -> String {
    let end = spans.iter().map(|s| s.end_ms.unwrap_or(s.start_ms)).fold(1.0f64, f64::max);
    let x = |ms: f64| LABEL_W + ms / end * PLOT_W;
    let height = 50.0 + ROW_H * spans.len() as f64 + 10.0;
    let width = LABEL_W + PLOT_W + 40.0;
    let mut out = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <title>{}</title>\n<rect x=\"0\" y=\"0\" width=\"{width}\" height=\"{height}\" fill=\"white\"/>\n\
         <text x=\"4\" y=\"14\" font-size=\"13\">{}</text>\n",
        escape(title),
        escape(title)
    );
    let step = tick_step(end);
    let mut t = 0.0;
    while t <= end {
        out.push_str(&format!(
            "<line x1=\"{0:.1}\" y1=\"30\" x2=\"{0:.1}\" y2=\"{1:.1}\" stroke=\"#ddd\"/>\n<text x=\"{0:.1}\" y=\"28\" text-anchor=\"middle\" fill=\"#555\">{2} ms</text>\n",
            x(t),
            height - 10.0,
            t
        ));
        t += step;
    }
    for (i, s) in spans.iter().enumerate() {
        let y = 40.0 + ROW_H * i as f64;
        let colour = match (s.kind, s.end_ms) {
            ("stage1", _) => "#7a9cc6",
            ("stage2", _) => "#6fb07f",
            (_, Some(_)) => "#e0944a",
            (_, None) => "#c44",
        };
        let w = s.end_ms.map(|e| (x(e) - x(s.start_ms)).max(1.0)).unwrap_or(2.0);
        let took =
            s.end_ms.map(|e| format!("{:.1} ms", e - s.start_ms)).unwrap_or_else(|| "not ready".into());
        out.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{w:.1}\" height=\"{:.1}\" fill=\"{colour}\"><title>{}: {} ms, {took}</title></rect>\n",
            LABEL_W - 6.0,
            y + 12.0,
            escape(&s.label),
            x(s.start_ms),
            y + 2.0,
            ROW_H - 4.0,
            escape(&s.label),
            s.start_ms
        ));
    }
    out.push_str("</svg>\n");
    out
}

pub fn run(client: &Client, args: &[String]) -> Result<()> {
    let mut svg_to = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--svg" => {
                svg_to = Some(it.next().ok_or_else(|| Error::Usage("--svg needs a file".into()))?.clone())
            }
            other => return usage(format!("boot: unexpected argument '{other}'")),
        }
    }
    let text = client.call("GET", "/boot", None).map_err(|e| Error::Failed(e.to_string()))?;
    let boot: Value =
        serde_json::from_str(&text).map_err(|e| Error::Failed(format!("GET /boot: not JSON: {e}")))?;
    let spans = spans(&boot);
    match svg_to.as_deref() {
        None => print!("{}", table(&spans)),
        Some("-") => print!("{}", svg("Berth boot timeline", &spans)),
        Some(path) => std::fs::write(path, svg("Berth boot timeline", &spans))
            .map_err(|e| Error::Failed(format!("writing {path}: {e}")))?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A small well-formedness check of XML: balanced tags, quoted attributes, no bare `<` or
    /// `&` in text (enough to catch what a hand-written SVG writer gets wrong).
    fn well_formed(doc: &str) -> std::result::Result<usize, String> {
        let mut stack: Vec<String> = Vec::new();
        let mut elements = 0;
        let mut rest = doc;
        while let Some(open) = rest.find('<') {
            let text = &rest[..open];
            check_text(text)?;
            let close = rest[open..].find('>').ok_or("an unclosed tag")? + open;
            let tag = &rest[open + 1..close];
            rest = &rest[close + 1..];
            if tag.starts_with('?') {
                continue;
            }
            if let Some(name) = tag.strip_prefix('/') {
                match stack.pop() {
                    Some(top) if top == name => {}
                    top => return Err(format!("</{name}> closes {top:?}")),
                }
                continue;
            }
            let selfclosing = tag.ends_with('/');
            let body = tag.trim_end_matches('/');
            let name = body.split_whitespace().next().ok_or("an empty tag")?;
            let mut attrs = &body[name.len()..];
            while !attrs.trim().is_empty() {
                let a = attrs.trim_start();
                let eq = a.find("=\"").ok_or(format!("attribute without a quoted value in <{tag}>"))?;
                let end = a[eq + 2..].find('"').ok_or("an unterminated attribute")? + eq + 2;
                check_text(&a[eq + 2..end])?;
                attrs = &a[end + 1..];
            }
            elements += 1;
            if !selfclosing {
                stack.push(name.to_string());
            }
        }
        check_text(rest)?;
        if !stack.is_empty() {
            return Err(format!("unclosed {stack:?}"));
        }
        Ok(elements)
    }

    fn check_text(t: &str) -> std::result::Result<(), String> {
        let mut r = t;
        while let Some(i) = r.find('&') {
            let ent = &r[i..];
            if !["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"].iter().any(|e| ent.starts_with(e)) {
                return Err(format!("a bare & in {t:?}"));
            }
            r = &r[i + 1..];
        }
        if t.contains('"') && t.contains('<') {
            return Err(format!("markup in text {t:?}"));
        }
        Ok(())
    }

    fn sample() -> Value {
        json!({
            "phases": [
                {"stage": 1, "name": "mounts", "start-ms": 410, "duration-us": 2500},
                {"stage": 2, "name": "data", "start-ms": 600, "duration-us": 30000},
            ],
            "services": [
                {"name": "containerd", "start-ms": 700, "ready-ms": 1900},
                {"name": "host-containers@a<&>\"'b", "start-ms": 1950, "ready-ms": null},
            ],
            "notices": [],
        })
    }

    #[test]
    fn spans_come_from_both_stages_and_the_services() {
        let s = spans(&sample());
        assert_eq!(s.len(), 4);
        assert_eq!(s[0].label, "stage 1: mounts");
        assert_eq!(s[1].end_ms, Some(630.0));
        assert_eq!((s[2].kind, s[2].end_ms), ("service", Some(1900.0)));
        assert_eq!(s[3].end_ms, None);
    }

    #[test]
    fn the_table_puts_the_longest_first_and_what_is_not_ready_last() {
        let t = table(&spans(&sample()));
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[1].contains("1200.0") && lines[1].ends_with("service containerd"), "{t}");
        assert!(lines[2].ends_with("stage 2: data"), "{t}");
        assert!(lines[4].contains("not ready"), "{t}");
    }

    #[test]
    fn the_svg_is_well_formed_with_one_bar_per_span_and_names_escaped() {
        let doc = svg("Berth <test> & co", &spans(&sample()));
        let elements = well_formed(&doc).unwrap_or_else(|e| panic!("{e}\n{doc}"));
        assert!(elements > 8);
        assert_eq!(doc.matches("<rect ").count(), 1 + 4, "background + one bar per span");
        assert!(doc.contains("host-containers@a&lt;&amp;&gt;&quot;&apos;b"));
        // The checker itself refuses what it must.
        assert!(well_formed("<svg><text>a < b</text></svg>").is_err());
        assert!(well_formed("<svg><g></svg>").is_err());
        assert!(well_formed("<svg a=b></svg>").is_err());
        assert!(well_formed("<svg>&nbsp</svg>").is_err());
        // An empty boot draws an empty, valid timeline.
        well_formed(&svg("empty", &[])).unwrap();
    }
}

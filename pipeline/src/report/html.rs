//! The report's HTML: escaping, tables whose numbers carry `data-metric` keys, and the page
//! around the sections. No scripts and no external resources: the page is one file that opens
//! offline, and text from documents can only ever be text.

use std::fmt::Write as _;

/// Escapes text for HTML element content and double-quoted attributes. Control characters
/// (other than newline and tab) become U+FFFD so a document cannot smuggle terminal or
/// rendering controls through the page.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '\n' | '\t' => out.push(c),
            c if c.is_control() => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

/// A table cell: text, or a number with the metric key it stands for.
pub enum Cell {
    Text(String),
    /// (key, value, shown as)
    Metric(String, f64, String),
}

impl Cell {
    pub fn text(s: impl Into<String>) -> Cell {
        Cell::Text(s.into())
    }

    /// A count, shown in full.
    pub fn count(key: impl Into<String>, n: f64) -> Cell {
        Cell::Metric(key.into(), n, format!("{}", n as i64))
    }

    /// A ratio or mean, shown with `digits` decimals.
    pub fn number(key: impl Into<String>, v: f64, digits: usize) -> Cell {
        Cell::Metric(key.into(), v, format!("{v:.digits$}"))
    }
}

/// A table with a header row; metric cells carry `data-metric` and `data-value` (the exact
/// value, for tests and scrapers).
pub fn table(header: &[&str], rows: &[Vec<Cell>]) -> String {
    let mut s = String::from("<table><thead><tr>");
    for h in header {
        let _ = write!(s, "<th>{}</th>", escape(h));
    }
    s.push_str("</tr></thead><tbody>");
    for row in rows {
        s.push_str("<tr>");
        for cell in row {
            match cell {
                Cell::Text(t) => {
                    let _ = write!(s, "<td>{}</td>", escape(t));
                }
                Cell::Metric(key, value, shown) => {
                    let _ = write!(
                        s,
                        "<td class=\"num\" data-metric=\"{}\" data-value=\"{value}\">{}</td>",
                        escape(key),
                        escape(shown)
                    );
                }
            }
        }
        s.push_str("</tr>");
    }
    s.push_str("</tbody></table>");
    s
}

/// At most this many characters of a document in an example.
pub const EXAMPLE_CHARS: usize = 600;

pub fn clip(s: &str) -> String {
    match s.char_indices().nth(EXAMPLE_CHARS) {
        Some((at, _)) => format!("{} …", &s[..at]),
        None => s.to_string(),
    }
}

/// Examples of untrusted text, each shown as preformatted text.
pub fn examples(items: &[(String, String)]) -> String {
    let mut s = String::from("<div class=\"examples\">");
    for (label, text) in items {
        let _ = write!(
            s,
            "<div class=\"example\"><div class=\"label\">{}</div><pre>{}</pre></div>",
            escape(label),
            escape(text)
        );
    }
    s.push_str("</div>");
    s
}

/// One section of the page.
pub struct Section {
    pub id: &'static str,
    pub title: &'static str,
    pub body: String,
}

const STYLE: &str = "
body{font-family:system-ui,sans-serif;margin:0;color:#222;background:#f6f6f4}
header{background:#1d3557;color:#fff;padding:16px 24px}
header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;opacity:.85;font-size:13px}
nav{padding:8px 24px;background:#e9ecef;font-size:13px}
nav a{margin-right:14px;color:#1d3557}
section{background:#fff;margin:16px 24px;padding:12px 20px;border-radius:6px;box-shadow:0 1px 2px rgba(0,0,0,.08)}
h2{font-size:18px;margin:6px 0 10px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border-bottom:1px solid #ddd;padding:3px 10px;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.charts{display:flex;flex-wrap:wrap;gap:12px}
figure.chart{margin:0}
.legend{font-size:12px;padding-left:70px}
.legend span{margin-right:12px;white-space:nowrap}
.legend i{display:inline-block;width:10px;height:10px;margin-right:4px;vertical-align:middle}
.note{color:#666;font-size:13px}
.examples{display:grid;grid-template-columns:repeat(auto-fill,minmax(380px,1fr));gap:8px}
.example{border:1px solid #ddd;border-radius:4px;padding:6px;background:#fafafa}
.example .label{font-size:12px;color:#555;margin-bottom:4px}
.example pre{white-space:pre-wrap;word-break:break-word;font-size:12px;margin:0;max-height:220px;overflow:auto}
";

/// The whole page.
pub fn page(title: &str, subtitle: &str, sections: &[Section]) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><style>{STYLE}</style></head><body>\
         <header><h1>{}</h1><p>{}</p></header><nav>",
        escape(title),
        escape(title),
        escape(subtitle)
    );
    for section in sections {
        let _ = write!(s, "<a href=\"#{}\">{}</a>", section.id, escape(section.title));
    }
    s.push_str("</nav>");
    for section in sections {
        let _ = write!(
            s,
            "<section id=\"{}\"><h2>{}</h2>{}</section>",
            section.id,
            escape(section.title),
            section.body
        );
    }
    s.push_str("</body></html>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_and_controls_become_text() {
        assert_eq!(
            escape("<script>alert('x')</script> & \"q\"\u{1b}[2J"),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;\u{FFFD}[2J"
        );
    }
}

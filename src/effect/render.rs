//! Showing effects to people: a terminal heatmap and a self-contained HTML page.

use std::fmt::Write;

use super::Effects;

/// Colour scale: how far |Δp| must reach for each of the four shades.
const STEPS: [f32; 4] = [0.02, 0.05, 0.15, 0.30];

fn shade(delta_p: f32) -> usize {
    STEPS.iter().filter(|&&s| delta_p.abs() >= s).count()
}

/// The response as an ANSI-coloured heatmap: green where the history made the
/// token more likely, red where less, deeper with a larger |Δp|;
/// preference-bearing tokens are bold and underlined. Ends with a legend.
pub fn to_terminal(effects: &Effects) -> String {
    // 256-colour backgrounds, from faint to strong.
    const GREEN: [u8; 4] = [194, 157, 114, 34];
    const RED: [u8; 4] = [224, 217, 210, 160];
    let mut out = String::new();
    for token in &effects.tokens {
        let level = shade(token.delta_p);
        let mut style = String::new();
        if level > 0 {
            let palette = if token.delta_p > 0.0 { GREEN } else { RED };
            let _ = write!(style, "\x1b[48;5;{}m\x1b[38;5;16m", palette[level - 1]);
        }
        if token.preference_bearing {
            style.push_str("\x1b[1;4m");
        }
        // Colour never spans a line break, or the terminal paints the margin.
        for (i, line) in token.text.split('\n').enumerate() {
            if i > 0 {
                out.push('\n');
            }
            if style.is_empty() || line.is_empty() {
                out.push_str(line);
            } else {
                let _ = write!(out, "{style}{line}\x1b[0m");
            }
        }
    }
    let _ = write!(
        out,
        "\n\n\x1b[48;5;114m\x1b[38;5;16m green \x1b[0m history made the token more likely   \
         \x1b[48;5;210m\x1b[38;5;16m red \x1b[0m less likely   \
         \x1b[1;4mbold underlined\x1b[0m preference-bearing (Δp > δ = {})\n\
         {} of {} tokens preference-bearing ({:.0}%), {} history items in the prompt\n",
        effects.delta,
        effects
            .tokens
            .iter()
            .filter(|t| t.preference_bearing)
            .count(),
        effects.tokens.len(),
        100.0 * effects.preference_bearing_share(),
        effects.history_used,
    );
    out
}

/// A self-contained XHTML page: one `<span class="t">` per token, coloured by
/// Δp, with every number of the token in its hover title.
pub fn to_html(effects: &Effects, title: &str) -> String {
    let mut body = String::new();
    for token in &effects.tokens {
        let alpha = (token.delta_p.abs() / STEPS[3]).min(1.0) * 0.85;
        let rgb = if token.delta_p >= 0.0 {
            "40,160,70"
        } else {
            "210,50,50"
        };
        let mut hover = format!(
            "Δp {:+.4} | log p with history {:.3} | without {:.3} | Δ log p {:+.3} | weight {:.4}",
            token.delta_p, token.logp_with, token.logp_without, token.delta_logp, token.weight
        );
        if let Some(js) = token.js_divergence {
            let _ = write!(hover, " | JS {js:.4}");
        }
        let class = if token.preference_bearing {
            "t pb"
        } else {
            "t"
        };
        let _ = write!(
            body,
            "<span class=\"{class}\" style=\"background:rgba({rgb},{alpha:.3})\" \
             data-delta-p=\"{:.6}\" title=\"{}\">{}</span>",
            token.delta_p,
            escape(&hover),
            escape(&token.text)
        );
    }
    format!(
        "<!DOCTYPE html>\n<html xmlns=\"http://www.w3.org/1999/xhtml\" lang=\"en\">\n<head>\n\
         <meta charset=\"utf-8\" />\n<title>{title}</title>\n<style>\n\
         body {{ font: 16px/1.7 system-ui, sans-serif; max-width: 46em; margin: 2em auto; }}\n\
         .text {{ white-space: pre-wrap; }}\n\
         .t {{ border-radius: 3px; }}\n\
         .pb {{ text-decoration: underline 2px; font-weight: 600; }}\n\
         .legend {{ color: #555; font-size: 14px; }}\n\
         </style>\n</head>\n<body>\n<h1>{title}</h1>\n<p class=\"text\">{body}</p>\n\
         <p class=\"legend\">Green: the history made the token more likely; red: less likely. \
         Underlined: preference-bearing (Δp &gt; δ = {delta}). {pb} of {n} tokens preference-bearing; \
         {h} history items in the prompt. Hover a token for its numbers.</p>\n</body>\n</html>\n",
        title = escape(title),
        delta = effects.delta,
        pb = effects.tokens.iter().filter(|t| t.preference_bearing).count(),
        n = effects.tokens.len(),
        h = effects.history_used,
    )
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // Control characters are not allowed in XHTML.
            c if c.is_control() && c != '\n' && c != '\t' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::effect::TokenEffect;

    fn effects() -> Effects {
        let token = |text: &str, delta_p: f32, pb: bool| TokenEffect {
            token: 1,
            text: text.into(),
            logp_with: -1.0,
            logp_without: -2.0,
            delta_p,
            delta_logp: 1.0,
            js_divergence: None,
            preference_bearing: pb,
            weight: 0.5,
        };
        Effects {
            tokens: vec![
                token("<b>\"Soft", 0.4, true),
                token(" & snug\ngly", -0.1, false),
            ],
            delta: 0.05,
            history_used: 3,
        }
    }

    #[test]
    fn html_escapes_text_and_holds_one_span_per_token() {
        let html = to_html(&effects(), "u001 <item>");
        assert_eq!(html.matches("<span class=\"t").count(), 2);
        assert!(html.contains("&lt;b&gt;&quot;Soft"));
        assert!(html.contains(" &amp; snug\ngly"));
        assert!(html.contains("<title>u001 &lt;item&gt;</title>"));
    }

    #[test]
    fn terminal_marks_preference_bearing_tokens_and_keeps_text() {
        let text = to_terminal(&effects());
        assert!(text.contains("\x1b[1;4m"));
        let plain: String = {
            let mut out = String::new();
            let mut chars = text.chars();
            while let Some(c) = chars.next() {
                if c == '\x1b' {
                    for c in chars.by_ref() {
                        if c == 'm' {
                            break;
                        }
                    }
                } else {
                    out.push(c);
                }
            }
            out
        };
        assert!(plain.starts_with("<b>\"Soft & snug\ngly"));
        assert!(plain.contains("1 of 2 tokens preference-bearing"));
    }
}

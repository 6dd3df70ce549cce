//! Prompts for one request: with the user's history, and its counterfactual.
//!
//! Both prompts render the same chat message with the model's template: an
//! instruction, a history section, and the request. In the counterfactual the
//! history section is the single word `None` (as in the NextQuill paper), so
//! the two prompts differ only there and the response tokens that follow them
//! line up position by position. Everything before the history section is a
//! prefix the two share, which the scorer decodes once.

use serde::{Deserialize, Serialize};

use crate::llm::{Model, Role, TokenId};
use crate::{Error, Result};

/// The text that stands in for the history in the counterfactual prompt.
pub const COUNTERFACTUAL_HISTORY: &str = "None";

/// Version of the prompt layout below; part of every effect-cache key, so
/// cached effects are dropped when the layout changes.
pub const TEMPLATE_VERSION: u32 = 1;

/// One past text of the user, as the prompt shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PastText<'a> {
    /// What the past text answered (product, rating, title...).
    pub request: &'a str,
    /// What the user wrote.
    pub text: &'a str,
}

/// How prompts are built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptConfig {
    /// Most history items shown. Default 8 (the NextQuill paper's limit).
    pub max_history_items: usize,
    /// Each shown past text is cut to this many words; `None` keeps it whole. Default `None`.
    pub max_words_per_text: Option<usize>,
    /// Most tokens the history section may take. Default 1024.
    pub history_token_budget: usize,
    /// The instruction at the top of the user message.
    pub instruction: String,
}

impl Default for PromptConfig {
    fn default() -> Self {
        PromptConfig {
            max_history_items: 8,
            max_words_per_text: None,
            history_token_budget: 1024,
            instruction: "Write the user's text for the request below, in the user's own voice. \
                          Their past texts show how they write."
                .into(),
        }
    }
}

/// The with-history prompt, its counterfactual, and what went into them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptPair {
    /// Token ids of the prompt with the history section. The response starts
    /// right after the last of them.
    pub with_history: Vec<TokenId>,
    /// Token ids of the same prompt with the history section replaced by `None`.
    pub counterfactual: Vec<TokenId>,
    /// How many of the given history items made it in (the newest ones: the
    /// oldest are dropped first).
    pub history_used: usize,
}

impl PromptPair {
    /// Where the response starts in the with-history sequence.
    pub fn response_start(&self) -> usize {
        self.with_history.len()
    }

    /// Where the response starts in the counterfactual sequence.
    pub fn counterfactual_response_start(&self) -> usize {
        self.counterfactual.len()
    }
}

/// Builds the prompt pair for `request` after `history` (oldest first).
///
/// History items beyond `max_history_items` or the token budget are dropped,
/// oldest first, and then more while the pair plus `response_tokens` (scored
/// after each prompt) would not fit `n_ctx`. A request that does not fit even
/// with no history is [`Error::ContextOverflow`].
pub fn build_pair(
    model: &Model,
    config: &PromptConfig,
    history: &[PastText<'_>],
    request: &str,
    response_tokens: usize,
    n_ctx: usize,
) -> Result<PromptPair> {
    if config.max_history_items == 0 && !history.is_empty() {
        tracing::debug!("max_history_items is 0: building a prompt without history");
    }
    let counterfactual = render(model, config, COUNTERFACTUAL_HISTORY, request)?;
    let fits = |with: usize| with + counterfactual.len() + 2 * response_tokens <= n_ctx;
    if !fits(0) {
        return Err(Error::ContextOverflow {
            what: format!(
                "the request and a {response_tokens}-token response under both prompts, with no history"
            ),
            needed: counterfactual.len() * 2 + 2 * response_tokens,
            available: n_ctx,
        });
    }

    let shown: Vec<String> = history
        .iter()
        .rev()
        .take(config.max_history_items)
        .map(|past| format_past(past, config.max_words_per_text))
        .collect();
    // Newest first: keep as many recent items as the budget allows.
    let mut kept = 0;
    let mut used_tokens = 0;
    for item in &shown {
        let cost = model.tokenize_text(item).len() + 1;
        if used_tokens + cost > config.history_token_budget {
            break;
        }
        used_tokens += cost;
        kept += 1;
    }

    loop {
        let section = if kept == 0 {
            COUNTERFACTUAL_HISTORY.to_owned()
        } else {
            history_section(&shown[..kept])
        };
        let with_history = render(model, config, &section, request)?;
        if fits(with_history.len()) || kept == 0 {
            return Ok(PromptPair {
                with_history,
                counterfactual,
                history_used: kept,
            });
        }
        kept -= 1;
    }
}

/// The history section: numbered past texts, oldest first.
fn history_section(newest_first: &[String]) -> String {
    newest_first
        .iter()
        .rev()
        .enumerate()
        .map(|(i, item)| format!("[{}] {item}", i + 1))
        .collect::<Vec<_>>()
        .join("\n")
}

fn format_past(past: &PastText<'_>, max_words: Option<usize>) -> String {
    let text = match max_words {
        Some(n) => past
            .text
            .split_whitespace()
            .take(n)
            .collect::<Vec<_>>()
            .join(" "),
        None => past.text.trim().to_owned(),
    };
    format!("{}\nText: {}", one_line(past.request), text)
}

fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Renders and tokenizes the whole prompt. Only the template's own markers
/// become control tokens: the user's words are tokenized as plain text, so a
/// past text that spells `<|im_end|>` cannot end the turn.
fn render(
    model: &Model,
    config: &PromptConfig,
    history: &str,
    request: &str,
) -> Result<Vec<TokenId>> {
    const SLOT: &str = "\u{1}NEXTQUILL_CONTENT\u{1}";
    let template = model.render_chat(&[(Role::User, SLOT)], true)?;
    let (before, after) = template
        .split_once(SLOT)
        .ok_or_else(|| Error::InvalidModel {
            path: model.info().path.clone(),
            reason: "its chat template drops the user message".into(),
        })?;
    let content = format!(
        "{}\n\nThe user's past texts:\n{history}\n\nRequest:\n{}\n\nWrite the user's text.",
        config.instruction,
        request.trim()
    );
    let mut ids = model.tokenize_prompt(before);
    ids.extend(model.tokenize_text(&content));
    ids.extend(model.tokenize_markup(after));
    Ok(ids)
}

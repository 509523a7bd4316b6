//! `mqtt-im policy test`: the script chain run over sample messages, one JSON object per line
//! (`from`, `to`, `text`, and optionally `group`, `media_url`, `client_id`, `msg_id`), so an
//! author can try scripts — in a team's own CI too — without running the broker.

use serde::Deserialize;

use super::{Decision, LuaPolicy, MessageView, Policy};

/// One sample message.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Sample {
    from: String,
    to: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    media_url: Option<String>,
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    client_id: Option<String>,
    #[serde(default)]
    msg_id: Option<String>,
}

/// What the chain made of one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed as sent.
    Allow,
    /// Allowed with this text.
    Rewrite(String),
    /// Denied with this reason.
    Deny(String),
    /// The line is not a sample message.
    Invalid(String),
}

impl MessageView {
    fn from_sample(sample: Sample, line: usize) -> Self {
        let conversation = match &sample.group {
            Some(gid) => format!("g/{gid}"),
            None => format!("u/{}", sample.to),
        };
        Self {
            chat_type: if sample.group.is_some() {
                "group"
            } else {
                "single"
            },
            client_id: sample
                .client_id
                .unwrap_or_else(|| format!("{}-test", sample.from)),
            msg_id: sample.msg_id.unwrap_or_else(|| format!("line-{line}")),
            from: sample.from,
            to: sample.to,
            group: sample.group,
            text: sample.text,
            media_url: sample.media_url,
            conversation,
        }
    }
}

/// Runs every non-blank line of `samples` through `policy`; (line number, verdict).
pub async fn run(policy: &LuaPolicy, samples: &str) -> Vec<(usize, Verdict)> {
    let mut verdicts = Vec::new();
    for (index, line) in samples.lines().enumerate() {
        let number = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        let verdict = match serde_json::from_str::<Sample>(line) {
            Err(e) => Verdict::Invalid(e.to_string()),
            Ok(sample) => match policy
                .on_message(MessageView::from_sample(sample, number))
                .await
            {
                Decision::Allow(None) => Verdict::Allow,
                Decision::Allow(Some(text)) => Verdict::Rewrite(text),
                Decision::Deny(reason) => Verdict::Deny(reason),
            },
        };
        verdicts.push((number, verdict));
    }
    verdicts
}

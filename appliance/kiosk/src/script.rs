//! The scripted input source: a visitor written down as a file, used by the demo and the tests.
//!
//! One step per line, `#` starts a comment:
//!
//! ```text
//! press start            # tap the centre of a control: start edit newseed finalize done
//!                        # backspace space shift clear thumbsup thumbsdown newpicture startover
//! type a red fox         # key presses, as from a physical keyboard (the rest of the line)
//! key backspace 3        # a named key, optionally repeated
//! tap 120 200            # a touch at a panel coordinate (hit-tested like a finger)
//! wait preview           # until the screen shows: attract prompt generating preview refining
//!                        # final error
//! after 1500             # let this many milliseconds pass (the kiosk keeps working)
//! ```

use diffusionx_ui::{Action, Key};

/// Which screen a `wait` waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScreenKind {
    /// Attract.
    Attract,
    /// Prompt entry.
    Prompt,
    /// A preview running.
    Generating,
    /// A preview shown.
    Preview,
    /// Refining.
    Refining,
    /// The final picture.
    Final,
    /// An error.
    Error,
}

impl ScreenKind {
    /// The kind of `screen`.
    pub fn of(screen: &diffusionx_ui::Screen) -> Self {
        use diffusionx_ui::Screen as S;
        match screen {
            S::Attract { .. } => Self::Attract,
            S::PromptEntry { .. } => Self::Prompt,
            S::Generating { .. } => Self::Generating,
            S::Preview { .. } => Self::Preview,
            S::Refining { .. } => Self::Refining,
            S::Final { .. } => Self::Final,
            S::Error { .. } => Self::Error,
        }
    }

    /// Its name in scripts and file names.
    pub fn name(self) -> &'static str {
        match self {
            Self::Attract => "attract",
            Self::Prompt => "prompt",
            Self::Generating => "generating",
            Self::Preview => "preview",
            Self::Refining => "refining",
            Self::Final => "final",
            Self::Error => "error",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        [
            Self::Attract,
            Self::Prompt,
            Self::Generating,
            Self::Preview,
            Self::Refining,
            Self::Final,
            Self::Error,
        ]
        .into_iter()
        .find(|k| k.name() == name)
    }
}

/// One scripted step.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Tap the control that performs this action.
    Press(Action),
    /// A key press from the physical keyboard.
    Key(Key),
    /// A touch at `(x, y)`.
    Tap(i32, i32),
    /// Until the screen is of this kind.
    Wait(ScreenKind),
    /// Let time pass.
    After(u64),
}

/// A script line the parser refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("line {line}: {message}")]
pub struct ScriptError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

fn named_key(name: &str) -> Option<Key> {
    Some(match name {
        "backspace" => Key::Backspace,
        "space" => Key::Space,
        "shift" => Key::Shift,
        "clear" => Key::Clear,
        "done" | "enter" => Key::Done,
        _ => return None,
    })
}

fn control(name: &str) -> Option<Action> {
    Some(match name {
        "start" => Action::StartSession,
        "edit" => Action::EditPrompt,
        "newseed" => Action::NewSeed,
        "finalize" => Action::Finalize,
        "thumbsup" => Action::ThumbsUp,
        "thumbsdown" => Action::ThumbsDown,
        "newpicture" => Action::NewPicture,
        "startover" => Action::StartOver,
        other => Action::Key(named_key(other)?),
    })
}

/// Parses a script.
pub fn parse(text: &str) -> Result<Vec<Step>, ScriptError> {
    let mut steps = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let err = |message: String| ScriptError { line, message };
        let content = raw.split('#').next().unwrap_or("");
        let trimmed = content.trim();
        if trimmed.is_empty() {
            continue;
        }
        let (verb, rest) = trimmed.split_once(' ').unwrap_or((trimmed, ""));
        match verb {
            "press" => steps.push(Step::Press(
                control(rest.trim()).ok_or_else(|| err(format!("unknown control {rest:?}")))?,
            )),
            "type" => {
                // Everything after "type " verbatim (inner spaces are typed too).
                let text = content.trim_start().strip_prefix("type ").unwrap_or("");
                for c in text.trim_end().chars() {
                    steps.push(Step::Key(if c == ' ' { Key::Space } else { Key::Char(c) }));
                }
            }
            "key" => {
                let mut words = rest.split_whitespace();
                let name = words.next().unwrap_or("");
                let key = named_key(name).ok_or_else(|| err(format!("unknown key {name:?}")))?;
                let times = match words.next() {
                    Some(n) => n.parse().map_err(|_| err(format!("bad count {n:?}")))?,
                    None => 1,
                };
                steps.extend(std::iter::repeat_n(Step::Key(key), times));
            }
            "tap" => {
                let xy: Vec<i32> = rest
                    .split_whitespace()
                    .map(str::parse)
                    .collect::<Result<_, _>>()
                    .map_err(|_| err(format!("tap wants two integers, got {rest:?}")))?;
                match xy[..] {
                    [x, y] => steps.push(Step::Tap(x, y)),
                    _ => return Err(err(format!("tap wants two integers, got {rest:?}"))),
                }
            }
            "wait" => steps.push(Step::Wait(
                ScreenKind::parse(rest.trim())
                    .ok_or_else(|| err(format!("unknown screen {rest:?}")))?,
            )),
            "after" => {
                steps.push(Step::After(rest.trim().parse().map_err(|_| {
                    err(format!("after wants milliseconds, got {rest:?}"))
                })?))
            }
            other => return Err(err(format!("unknown step {other:?}"))),
        }
    }
    Ok(steps)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_step_kind_parses() {
        let steps = parse(
            "# a visitor\npress start\ntype Hi there\nkey backspace 2\ntap 10 20\nwait preview\nafter 250\npress finalize # go\n",
        )
        .unwrap();
        assert_eq!(
            steps,
            vec![
                Step::Press(Action::StartSession),
                Step::Key(Key::Char('H')),
                Step::Key(Key::Char('i')),
                Step::Key(Key::Space),
                Step::Key(Key::Char('t')),
                Step::Key(Key::Char('h')),
                Step::Key(Key::Char('e')),
                Step::Key(Key::Char('r')),
                Step::Key(Key::Char('e')),
                Step::Key(Key::Backspace),
                Step::Key(Key::Backspace),
                Step::Tap(10, 20),
                Step::Wait(ScreenKind::Preview),
                Step::After(250),
                Step::Press(Action::Finalize),
            ]
        );
    }

    #[test]
    fn mistakes_name_their_line() {
        assert_eq!(
            parse("press start\nwait lunch\n").unwrap_err(),
            ScriptError {
                line: 2,
                message: "unknown screen \"lunch\"".into()
            }
        );
        assert_eq!(parse("tap 1\n").unwrap_err().line, 1);
        assert_eq!(
            parse("jump\n").unwrap_err().message,
            "unknown step \"jump\""
        );
    }
}

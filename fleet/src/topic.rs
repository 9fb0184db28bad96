//! The topic scheme: `kiosk/v1/{fleet}/{device}/{leaf}`, built and parsed here only.
//!
//! | leaf                | direction        | QoS | retained |
//! |---------------------|------------------|-----|----------|
//! | `status`            | kiosk -> fleet   | 1   | yes (and the last will) |
//! | `info`              | kiosk -> fleet   | 1   | yes |
//! | `telemetry`         | kiosk -> fleet   | 0   | yes (the latest sample) |
//! | `sessions`          | kiosk -> fleet   | 1   | no |
//! | `cmd/{name}`        | operator -> kiosk| 1   | no (v5 response topic, correlation, expiry) |
//! | `resp/{client}`     | kiosk -> operator| 1   | no (the only response topics a kiosk answers on) |
//! | `config/desired`    | operator -> kiosk| 1   | yes |
//! | `config/reported`   | kiosk -> fleet   | 1   | yes |
//!
//! Fleet, device and client names are 1 to 64 characters of `A-Z a-z 0-9 _ - .`, so they can
//! never contain MQTT wildcards or separators, and a per-device broker ACL on
//! `kiosk/v1/{fleet}/%u/#` confines a device to its own subtree (see `docs/mqtt.md`).

use std::fmt;

/// The versioned prefix of every topic.
pub const PREFIX: &str = "kiosk/v1";

/// Why a topic or a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// A fleet, device or client name with a character outside `A-Z a-z 0-9 _ - .`, empty, or
    /// longer than 64 characters.
    #[error("{kind} name {name:?} must be 1-64 characters of A-Z a-z 0-9 _ - .")]
    BadName {
        /// `fleet`, `device` or `client`.
        kind: &'static str,
        /// The refused name.
        name: String,
    },
    /// Not under `kiosk/v1/`, or an unknown leaf.
    #[error("not a DiffusionX topic: {0:?}")]
    Unknown(String),
}

/// A command an operator can send (`cmd/{name}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// Liveness and uptime.
    Ping,
    /// The settings in force.
    GetConfig,
    /// Change some settings (same rules as `config/desired`).
    SetConfig,
    /// Restart the kiosk process (after the reply is sent).
    Restart,
    /// Replace the prompt blocklist.
    SetBlocklist,
    /// Publish telemetry now and flush the session outbox.
    ReportNow,
}

impl Command {
    /// Every command, in documentation order.
    pub const ALL: [Command; 6] = [
        Command::Ping,
        Command::GetConfig,
        Command::SetConfig,
        Command::Restart,
        Command::SetBlocklist,
        Command::ReportNow,
    ];

    /// The name used in the topic (`cmd/{name}`) and by `dxctl cmd`.
    pub fn name(self) -> &'static str {
        match self {
            Command::Ping => "ping",
            Command::GetConfig => "get-config",
            Command::SetConfig => "set-config",
            Command::Restart => "restart",
            Command::SetBlocklist => "set-blocklist",
            Command::ReportNow => "report-now",
        }
    }

    /// The command of a name.
    pub fn from_name(name: &str) -> Option<Command> {
        Command::ALL.into_iter().find(|c| c.name() == name)
    }
}

/// What follows `{fleet}/{device}/`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Leaf {
    /// Presence (retained, and the last will).
    Status,
    /// Birth facts (retained).
    Info,
    /// Periodic measurements (the latest retained).
    Telemetry,
    /// One report per visitor session.
    Sessions,
    /// A command request.
    Cmd(Command),
    /// Replies to the operator tool whose client name this is.
    Response(String),
    /// The operator's settings (retained).
    ConfigDesired,
    /// What the kiosk applied (retained).
    ConfigReported,
}

impl Leaf {
    /// The QoS this leaf is published with.
    pub fn qos(&self) -> u8 {
        match self {
            Leaf::Telemetry => 0,
            _ => 1,
        }
    }

    /// Whether publishes on this leaf are retained.
    pub fn retain(&self) -> bool {
        matches!(
            self,
            Leaf::Status
                | Leaf::Info
                | Leaf::Telemetry
                | Leaf::ConfigDesired
                | Leaf::ConfigReported
        )
    }

    fn write(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Leaf::Status => f.write_str("status"),
            Leaf::Info => f.write_str("info"),
            Leaf::Telemetry => f.write_str("telemetry"),
            Leaf::Sessions => f.write_str("sessions"),
            Leaf::Cmd(command) => write!(f, "cmd/{}", command.name()),
            Leaf::Response(client) => write!(f, "resp/{client}"),
            Leaf::ConfigDesired => f.write_str("config/desired"),
            Leaf::ConfigReported => f.write_str("config/reported"),
        }
    }
}

/// One concrete topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Topic {
    /// The fleet.
    pub fleet: String,
    /// The kiosk.
    pub device: String,
    /// What about it.
    pub leaf: Leaf,
}

/// Checks a fleet, device or client name.
pub fn check_name(kind: &'static str, name: &str) -> Result<(), TopicError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(TopicError::BadName {
            kind,
            name: name.into(),
        })
    }
}

impl Topic {
    /// A topic, with its names checked.
    pub fn new(fleet: &str, device: &str, leaf: Leaf) -> Result<Topic, TopicError> {
        check_name("fleet", fleet)?;
        check_name("device", device)?;
        if let Leaf::Response(client) = &leaf {
            check_name("client", client)?;
        }
        Ok(Topic {
            fleet: fleet.into(),
            device: device.into(),
            leaf,
        })
    }

    /// Parses a topic string; anything outside the scheme is [`TopicError::Unknown`].
    pub fn parse(topic: &str) -> Result<Topic, TopicError> {
        let unknown = || TopicError::Unknown(topic.into());
        let rest = topic
            .strip_prefix(PREFIX)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(unknown)?;
        let parts: Vec<&str> = rest.split('/').collect();
        let (fleet, device, leaf) = match parts.as_slice() {
            [fleet, device, leaf @ ..] if !leaf.is_empty() => (*fleet, *device, leaf),
            _ => return Err(unknown()),
        };
        let leaf = match leaf {
            ["status"] => Leaf::Status,
            ["info"] => Leaf::Info,
            ["telemetry"] => Leaf::Telemetry,
            ["sessions"] => Leaf::Sessions,
            ["cmd", name] => Leaf::Cmd(Command::from_name(name).ok_or_else(unknown)?),
            ["resp", client] => Leaf::Response((*client).into()),
            ["config", "desired"] => Leaf::ConfigDesired,
            ["config", "reported"] => Leaf::ConfigReported,
            _ => return Err(unknown()),
        };
        Topic::new(fleet, device, leaf).map_err(|_| unknown())
    }

    /// Whether `topic` lies in this device's own subtree (the only place it may publish).
    pub fn is_own(fleet: &str, device: &str, topic: &str) -> bool {
        Topic::parse(topic).is_ok_and(|t| t.fleet == fleet && t.device == device)
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}/{}/{}/", self.fleet, self.device)?;
        self.leaf.write(f)
    }
}

/// A subscription filter for one leaf (`"status"`, `"sessions"`, `"cmd/+"`, ...) across a
/// fleet (or every fleet) and a device (or every device).
pub fn filter(fleet: Option<&str>, device: Option<&str>, leaf: &str) -> String {
    format!(
        "{PREFIX}/{}/{}/{leaf}",
        fleet.unwrap_or("+"),
        device.unwrap_or("+")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_leaf_round_trips_through_its_string() {
        let mut leaves = vec![
            Leaf::Status,
            Leaf::Info,
            Leaf::Telemetry,
            Leaf::Sessions,
            Leaf::Response("dxctl-7".into()),
            Leaf::ConfigDesired,
            Leaf::ConfigReported,
        ];
        leaves.extend(Command::ALL.map(Leaf::Cmd));
        for leaf in leaves {
            let topic = Topic::new("museum", "kiosk-01", leaf).expect("valid names");
            let text = topic.to_string();
            assert_eq!(Topic::parse(&text), Ok(topic), "{text}");
        }
        assert_eq!(
            Topic::new("museum", "kiosk-01", Leaf::Cmd(Command::SetBlocklist))
                .expect("valid")
                .to_string(),
            "kiosk/v1/museum/kiosk-01/cmd/set-blocklist"
        );
    }

    #[test]
    fn names_that_could_escape_a_subtree_are_refused() {
        for bad in ["", "a/b", "+", "#", "kiosk 1", &"x".repeat(65), "ü"] {
            assert!(
                Topic::new("museum", bad, Leaf::Status).is_err(),
                "device {bad:?}"
            );
            assert!(
                Topic::new(bad, "k1", Leaf::Status).is_err(),
                "fleet {bad:?}"
            );
        }
        assert!(Topic::new("m", "k", Leaf::Response("a/b".into())).is_err());
        for unknown in [
            "kiosk/v2/m/k/status",
            "kiosk/v1/m/k",
            "kiosk/v1/m/k/",
            "kiosk/v1/m/k/cmd/format-disk",
            "kiosk/v1/m/k/status/extra",
            "kiosk/v1/m/+/status",
        ] {
            assert!(
                matches!(Topic::parse(unknown), Err(TopicError::Unknown(_))),
                "{unknown}"
            );
        }
    }

    #[test]
    fn qos_and_retain_follow_the_table() {
        let table: Vec<(Leaf, u8, bool)> = vec![
            (Leaf::Status, 1, true),
            (Leaf::Info, 1, true),
            (Leaf::Telemetry, 0, true),
            (Leaf::Sessions, 1, false),
            (Leaf::Cmd(Command::Ping), 1, false),
            (Leaf::Response("c".into()), 1, false),
            (Leaf::ConfigDesired, 1, true),
            (Leaf::ConfigReported, 1, true),
        ];
        for (leaf, qos, retain) in table {
            assert_eq!((leaf.qos(), leaf.retain()), (qos, retain), "{leaf:?}");
        }
    }

    #[test]
    fn own_subtree_and_filters() {
        assert!(Topic::is_own("m", "k1", "kiosk/v1/m/k1/resp/dxctl-1"));
        assert!(!Topic::is_own("m", "k1", "kiosk/v1/m/k2/resp/dxctl-1"));
        assert!(!Topic::is_own("m", "k1", "elsewhere/k1"));
        assert_eq!(filter(Some("m"), None, "status"), "kiosk/v1/m/+/status");
        assert_eq!(filter(None, Some("k1"), "cmd/+"), "kiosk/v1/+/k1/cmd/+");
    }
}

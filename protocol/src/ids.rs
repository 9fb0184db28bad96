//! Identifiers: jobs and sessions are 16 random bytes, devices are short ASCII names.

use std::fmt;

use crate::error::ValidationError;

macro_rules! id16 {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name([u8; 16]);

        impl $name {
            /// The id with these bytes (a UUID's 16 bytes fit as they are).
            pub const fn from_bytes(bytes: [u8; 16]) -> Self {
                Self(bytes)
            }

            /// The id's 16 bytes, as they travel on the wire.
            pub const fn as_bytes(&self) -> &[u8; 16] {
                &self.0
            }
        }

        impl fmt::Display for $name {
            /// 32 lowercase hex digits.
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({self})", stringify!($name))
            }
        }
    };
}

id16!(
    /// One refinement job: chosen by the kiosk, unique per finalize.
    JobId
);
id16!(
    /// One visitor session on a kiosk (all rounds from first prompt to final image).
    SessionId
);

/// A kiosk's name in the fleet: 1 to 64 bytes of `[A-Za-z0-9._-]`, so it is safe in MQTT
/// topics, file names and logs as it is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(String);

impl DeviceId {
    /// Longest device id in bytes.
    pub const MAX_LEN: usize = 64;

    /// Checks `name` and wraps it.
    pub fn new(name: impl Into<String>) -> Result<Self, ValidationError> {
        let name = name.into();
        let valid_byte = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-');
        if name.is_empty() || name.len() > Self::MAX_LEN || !name.bytes().all(|b| valid_byte(&b)) {
            return Err(ValidationError::InvalidDeviceId(name));
        }
        Ok(Self(name))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

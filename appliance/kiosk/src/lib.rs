//! The kiosk: what a visitor meets.
//!
//! [`session`] is the pure state machine of a visitor session (rounds, edits, cancel-on-edit,
//! seed continuity, finalize, cloud outcomes, fallback, idle timeout), driven in simulated time
//! by its tests. The shell around it ([`runner::Kiosk`]) runs it against the real edge engine on
//! its own thread ([`engine`]), the gateway over QUIC with the kiosk's fleet certificate
//! ([`cloud`]), a display from `diffusionx-ui` and a scripted or real input source
//! ([`script`], or touch and keyboard through [`evdev`]) or the Linux framebuffer ([`fbdev`]) or an SPI TFT ([`spi_panel`]), and writes the session record before the network is touched ([`records`]).

pub mod cloud;
pub mod config;
pub mod engine;
pub mod evdev;
pub mod facts;
pub mod fbdev;
pub mod level;
pub mod records;
pub mod runner;
pub mod script;
pub mod session;
pub mod spi_panel;

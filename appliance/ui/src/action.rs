//! What a tap means: the actions the session state machine receives.

/// A key of the on-screen keyboard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Key {
    /// A printable character, already in the case the shift state selected.
    Char(char),
    /// Delete the character before the cursor.
    Backspace,
    /// Insert a space.
    Space,
    /// Toggle capitals for the next letter.
    Shift,
    /// Erase the whole prompt.
    Clear,
    /// The prompt is ready: make a preview.
    Done,
}

impl Key {
    /// Whether `self` and `other` are the same physical key, ignoring letter case.
    ///
    /// The session may record a press as `Char('A')` and turn shift off before the next frame
    /// is drawn; the pressed highlight must still land on the `a` key.
    pub(crate) fn same_key(self, other: Key) -> bool {
        match (self, other) {
            (Key::Char(a), Key::Char(b)) => a.to_lowercase().eq(b.to_lowercase()),
            (a, b) => a == b,
        }
    }
}

/// What a tap on a control asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// A key of the on-screen keyboard (including the done button).
    Key(Key),
    /// A tap anywhere on the attract screen.
    StartSession,
    /// Go back to the keyboard to change the prompt.
    EditPrompt,
    /// Draw the same prompt again with another seed.
    NewSeed,
    /// Refine this preview into the final picture.
    Finalize,
    /// The visitor likes the final picture.
    ThumbsUp,
    /// The visitor does not like the final picture.
    ThumbsDown,
    /// Start a new picture from an empty prompt.
    NewPicture,
    /// Leave the error screen.
    StartOver,
}

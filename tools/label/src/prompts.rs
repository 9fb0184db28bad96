//! The prompt list: one prompt per line, and a stable id per prompt.

use crate::error::LabelError;

/// The prompts of a list file: one per line, surrounding whitespace trimmed; blank lines and
/// lines starting with `#` are skipped. An empty list is an error.
pub fn parse_prompts(text: &str) -> Result<Vec<String>, LabelError> {
    let prompts: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(str::to_owned)
        .collect();
    if prompts.is_empty() {
        return Err(LabelError::NoPrompts);
    }
    Ok(prompts)
}

/// The dataset's `prompt_id` of a prompt: `p` and the 16 hex digits of the FNV-1a 64 hash of
/// its UTF-8 bytes. It depends on the text only (not on its line or the seed), so the same
/// prompt keeps its id across lists and runs, and the trainer's split by prompt id keeps all
/// of its seeds on one side.
pub fn prompt_id(prompt: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in prompt.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("p{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_become_prompts_without_blanks_or_comments() {
        let text = "# a comment\n  a lighthouse at dusk  \n\n\ta red fox\n#another\n";
        assert_eq!(
            parse_prompts(text).expect("two prompts"),
            ["a lighthouse at dusk", "a red fox"]
        );
        assert!(matches!(
            parse_prompts("\n# only comments\n  \n"),
            Err(LabelError::NoPrompts)
        ));
    }

    #[test]
    fn prompt_ids_are_fnv1a_of_the_text() {
        // FNV-1a 64 of the empty string is its offset basis; of "a" a published test vector.
        assert_eq!(prompt_id(""), "pcbf29ce484222325");
        assert_eq!(prompt_id("a"), "paf63dc4c8601ec8c");
        assert_ne!(prompt_id("a red fox"), prompt_id("a red fox "));
    }
}

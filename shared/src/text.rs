//! Which characters change how text looks without being seen. Texts from
//! clients and approvers (statements, names, reasons) are shown to people in
//! terminals, chat and the console; these characters could make them show
//! something else.

/// Control characters (C0, DEL, C1), bidirectional overrides and isolates,
/// and characters a terminal may draw at another width than they are
/// counted at: zero-width ones (joiners, spaces, variation selectors,
/// combining marks), the soft hyphen and the Hangul fillers. Drawn escaped
/// (the console) or refused (reasons given to the API).
pub fn is_hidden(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{202A}'..='\u{202E}'
                | '\u{2066}'..='\u{2069}'
                | '\u{200B}'..='\u{200F}'
                | '\u{061C}'
                | '\u{00AD}'
                | '\u{115F}'
                | '\u{1160}'
                | '\u{3164}'
                | '\u{FFA0}'
                | '\u{2060}'..='\u{2064}'
                | '\u{FEFF}'
                | '\u{180E}'
                | '\u{E0000}'..='\u{E007F}'
        )
        || unicode_width::UnicodeWidthChar::width(c) != Some(1) && unicode_width::UnicodeWidthChar::width(c) != Some(2)
}

#[cfg(test)]
mod tests {
    use super::is_hidden;

    #[test]
    fn what_is_hidden() {
        for c in [
            '\x1b', '\x07', '\u{9b}', '\x7f', '\u{202e}', '\u{200d}', '\u{ad}', '\u{3164}', '\u{fe0f}', '\u{301}',
            '\u{34f}',
        ] {
            assert!(is_hidden(c), "{:04x}", c as u32);
        }
        for c in ['a', ' ', '漢', '👩', 'é', '€'] {
            assert!(!is_hidden(c), "{c}");
        }
    }
}

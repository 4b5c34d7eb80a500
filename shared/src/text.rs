//! Which characters change how text looks without being seen. Texts from
//! clients and approvers (statements, names, reasons) are shown to people in
//! terminals, chat and the console; these characters could make them show
//! something else.

/// Characters a terminal may draw at another width than they are counted
/// at, on top of [`is_invisible`]: anything not exactly one or two columns
/// wide (combining marks, variation selectors...). The console draws them
/// escaped, which keeps its tables aligned.
pub fn is_hidden(c: char) -> bool {
    is_invisible(c)
        || unicode_width::UnicodeWidthChar::width(c) != Some(1) && unicode_width::UnicodeWidthChar::width(c) != Some(2)
}

/// Control characters (C0, DEL, C1), bidirectional overrides and isolates,
/// zero-width spaces and joiners, the soft hyphen and the Hangul fillers:
/// characters that are not seen but change what is. The API refuses them
/// in reasons people will read; combining marks, which whole scripts need,
/// are not among them.
pub fn is_invisible(c: char) -> bool {
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
}

#[cfg(test)]
mod tests {
    use super::is_hidden;

    #[test]
    fn scripts_with_combining_marks_are_not_invisible() {
        use super::is_invisible;
        // Hindi and Vietnamese (decomposed) reasons are plain text.
        for text in ["नमस्ते", "Vie\u{0323}\u{0302}t"] {
            assert!(!text.chars().any(is_invisible), "{text}");
        }
        for c in ['\x1b', '\u{202e}', '\u{200d}', '\u{ad}', '\u{3164}', '\u{feff}'] {
            assert!(is_invisible(c), "{:04x}", c as u32);
        }
    }

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

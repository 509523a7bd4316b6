//! Multi-pattern word matching for policy scripts: one Aho-Corasick automaton per word list,
//! built once. Text and words are normalized the same way before matching, so a word cannot
//! be walked around: Unicode NFKC (full-width and mathematical letters become plain ones),
//! lowercase, invisible characters (zero-width, soft hyphen, other format and
//! default-ignorable characters) skipped, whitespace runs collapsed to one space, and
//! look-alike letters of other scripts (Cyrillic `а`, Greek `ο`, ...) mapped to the Latin
//! letter they imitate (Unicode's confusables, UTS #39). Masking replaces the original
//! characters. Optionally only whole words match in scripts that separate words by spaces.

use std::borrow::Cow;

use aho_corasick::{AhoCorasick, MatchKind};
use unicode_normalization::UnicodeNormalization;
use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};
use unicode_script::{Script, UnicodeScript};

/// A compiled word list.
#[derive(Debug, Clone)]
pub struct WordList {
    matcher: AhoCorasick,
    words: Vec<String>,
    whole_words: bool,
}

/// Normalized text, remembering which original char each byte came from.
struct Folded {
    text: String,
    /// For each byte of `text`, the index of the original char it came from; empty when
    /// the two line up byte for byte.
    origin: Vec<usize>,
}

impl Folded {
    /// The index of the original char byte `byte` of the normalized text came from.
    fn origin(&self, byte: usize) -> usize {
        self.origin.get(byte).copied().unwrap_or(byte)
    }
}

/// Default-ignorable code points that are not format characters (Unicode's
/// DerivedCoreProperties): combining grapheme joiner, Hangul fillers, Khmer inherent vowels,
/// Mongolian and other variation selectors.
const IGNORABLE_OTHER: [(char, char); 8] = [
    ('\u{034F}', '\u{034F}'),
    ('\u{115F}', '\u{1160}'),
    ('\u{17B4}', '\u{17B5}'),
    ('\u{180B}', '\u{180F}'),
    ('\u{3164}', '\u{3164}'),
    ('\u{FE00}', '\u{FE0F}'),
    ('\u{FFA0}', '\u{FFA0}'),
    ('\u{E0100}', '\u{E01EF}'),
];

fn invisible(c: char) -> bool {
    c.general_category() == GeneralCategory::Format
        || IGNORABLE_OTHER
            .iter()
            .any(|(lo, hi)| (*lo..=*hi).contains(&c))
}

/// The Latin letter or digit a look-alike of another script imitates, if there is one.
fn unconfuse(c: char) -> Option<char> {
    if c.is_ascii() {
        return None;
    }
    let mut buffer = [0u8; 4];
    let mut prototype = unicode_security::skeleton(c.encode_utf8(&mut buffer));
    match (prototype.next(), prototype.next()) {
        (Some(p), None) if p.is_ascii_alphanumeric() => Some(p.to_ascii_lowercase()),
        _ => None,
    }
}

/// ASCII without whitespace runs folds byte for byte (lowercase, whitespace as one space):
/// the common case, without the per-byte bookkeeping of [`fold`].
fn fold_ascii(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let run = |pair: &[u8]| pair[0].is_ascii_whitespace() && pair[1].is_ascii_whitespace();
    if !text.is_ascii() || bytes.windows(2).any(run) {
        return None;
    }
    let folded = bytes
        .iter()
        .map(|&b| match b {
            b if b.is_ascii_whitespace() => b' ',
            b => b.to_ascii_lowercase(),
        })
        .collect();
    String::from_utf8(folded).ok()
}

fn fold(text: &str) -> Folded {
    match fold_ascii(text) {
        Some(folded) => Folded {
            text: folded,
            origin: Vec::new(),
        },
        None => fold_unicode(text),
    }
}

/// NFKC, lowercase, invisible characters skipped, whitespace runs collapsed, look-alikes
/// mapped; each normalized byte remembers its original char.
fn fold_unicode(text: &str) -> Folded {
    let mut folded = String::with_capacity(text.len());
    let mut origin = Vec::with_capacity(text.len());
    let mut push = |folded: &mut String, c: char, index: usize| {
        folded.push(c);
        origin.extend(std::iter::repeat_n(index, c.len_utf8()));
    };
    let mut after_space = false;
    for (index, original) in text.chars().enumerate() {
        if original.is_ascii() {
            // ASCII is its own NFKC form, never invisible and never a look-alike.
            if original.is_ascii_whitespace() {
                if !after_space {
                    push(&mut folded, ' ', index);
                    after_space = true;
                }
            } else {
                after_space = false;
                push(&mut folded, original.to_ascii_lowercase(), index);
            }
            continue;
        }
        if invisible(original) {
            continue;
        }
        for c in std::iter::once(original).nfkc() {
            if c.is_whitespace() {
                if !after_space {
                    push(&mut folded, ' ', index);
                    after_space = true;
                }
                continue;
            }
            after_space = false;
            for lower in c.to_lowercase() {
                push(&mut folded, unconfuse(lower).unwrap_or(lower), index);
            }
        }
    }
    Folded {
        text: folded,
        origin,
    }
}

/// A letter or digit of a script that puts spaces between words.
fn spaced_word_char(c: char) -> bool {
    c.is_alphanumeric()
        && !matches!(
            c.script(),
            Script::Han
                | Script::Hiragana
                | Script::Katakana
                | Script::Thai
                | Script::Lao
                | Script::Khmer
                | Script::Myanmar
                | Script::Tibetan
        )
}

impl WordList {
    /// Compiles `words` (one per entry; blank entries and `#` comments are skipped). With
    /// `whole_words`, a word written in a spaced script matches only as a whole word.
    ///
    /// # Errors
    /// The automaton could not be built (far beyond any realistic list size).
    pub fn new<I, S>(words: I, whole_words: bool) -> Result<Self, aho_corasick::BuildError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let words: Vec<String> = words
            .into_iter()
            .map(|w| w.as_ref().trim().to_owned())
            .filter(|w| !w.is_empty() && !w.starts_with('#'))
            .map(|w| fold(&w).text)
            .filter(|w| !w.is_empty())
            .collect();
        let matcher = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&words)?;
        Ok(Self {
            matcher,
            words,
            whole_words,
        })
    }

    /// Number of words in the list.
    pub fn len(&self) -> usize {
        self.words.len()
    }

    /// Whether the list has no words.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// The matches in normalized text, whole words only where that applies.
    fn matches<'a>(&'a self, folded: &'a Folded) -> impl Iterator<Item = aho_corasick::Match> + 'a {
        self.matcher
            .find_iter(&folded.text)
            .filter(move |m| !self.whole_words || whole(&folded.text, m.start(), m.end()))
    }

    /// The listed words found in `text` (normalized, in order of appearance).
    pub fn find(&self, text: &str) -> Vec<String> {
        let folded = fold(text);
        self.matches(&folded)
            .map(|m| self.words[m.pattern().as_usize()].clone())
            .collect()
    }

    /// `text` with every original character of every listed word replaced by `mask`
    /// (borrowed when nothing was masked), and how many words were masked.
    pub fn mask<'t>(&self, text: &'t str, mask: char) -> (Cow<'t, str>, usize) {
        let folded = fold(text);
        let mut hidden: Vec<bool> = Vec::new();
        let mut count = 0;
        for m in self.matches(&folded) {
            if hidden.is_empty() {
                hidden = vec![false; text.chars().count()];
            }
            count += 1;
            let (first, last) = (folded.origin(m.start()), folded.origin(m.end() - 1));
            // Invisible characters inside the word are part of it.
            hidden[first..=last].fill(true);
        }
        if count == 0 {
            return (Cow::Borrowed(text), 0);
        }
        let masked = text
            .chars()
            .zip(hidden)
            .map(|(c, hide)| if hide { mask } else { c })
            .collect();
        (Cow::Owned(masked), count)
    }
}

/// Whether `text[start..end]` is not glued to letters of a spaced script on either side.
fn whole(text: &str, start: usize, end: usize) -> bool {
    let inner_first = text[start..end].chars().next();
    let inner_last = text[start..end].chars().next_back();
    let before = text[..start].chars().next_back();
    let after = text[end..].chars().next();
    let glued = |outer: Option<char>, inner: Option<char>| matches!((outer, inner), (Some(o), Some(i)) if spaced_word_char(o) && spaced_word_char(i));
    !glued(before, inner_first) && !glued(after, inner_last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_ascii_folds_as_the_unicode_path_does() {
        for text in ["Hello World", " Tab\there\nNL ", "a", "", "MiXeD 123!?"] {
            let fast = fold_ascii(text).unwrap();
            let full = fold_unicode(text);
            assert_eq!(fast, full.text);
            assert!(full.origin.iter().enumerate().all(|(byte, &c)| byte == c));
        }
        assert_eq!(fold_ascii("two  spaces"), None);
        assert_eq!(fold_ascii("café"), None);
    }

    #[test]
    fn matches_case_insensitively_and_masks_per_character() {
        let list = WordList::new(["Darn", "heck", "# comment", ""], true).unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list.find("Oh DARN it, heck"), vec!["darn", "heck"]);
        assert_eq!(list.mask("Oh DARN it", '*'), ("Oh **** it".into(), 1));
        assert_eq!(list.mask("clean", '*'), ("clean".into(), 0));
    }

    #[test]
    fn chinese_and_length_changing_case_folds() {
        let list = WordList::new(["坏蛋", "straße"], true).unwrap();
        assert_eq!(list.mask("你是坏蛋吗", '*'), ("你是**吗".into(), 1));
        // 'İ' lowercases to two chars; masking still lines up with the original text.
        assert_eq!(
            list.mask("İ STRASSE Straße", '#'),
            ("İ STRASSE ######".into(), 1)
        );
    }

    #[test]
    fn longest_match_wins() {
        let list = WordList::new(["bad", "badword"], false).unwrap();
        assert_eq!(list.find("a badword here"), vec!["badword"]);
    }

    #[test]
    fn disguised_words_are_found_and_masked_in_the_original() {
        let list = WordList::new(["darn", "坏蛋", "free crypto"], true).unwrap();
        // Full-width, mathematical bold, Cyrillic look-alikes.
        assert_eq!(list.find("ＤＡＲＮ"), vec!["darn"]);
        assert_eq!(
            list.find("\u{1D41D}\u{1D41A}\u{1D42B}\u{1D427}"),
            vec!["darn"]
        );
        assert_eq!(list.find("d\u{0430}rn"), vec!["darn"]);
        // Zero-width characters and a soft hyphen inside the word.
        for hidden in ['\u{200B}', '\u{200C}', '\u{200D}', '\u{2060}', '\u{00AD}'] {
            let text = format!("坏{hidden}蛋 da{hidden}rn");
            assert_eq!(list.find(&text), vec!["坏蛋", "darn"], "{hidden:?}");
            assert_eq!(list.mask(&text, '*').0, "*** *****");
        }
        // Double and no-break spaces inside a phrase.
        assert_eq!(list.find("FREE  crypto"), vec!["free crypto"]);
        assert_eq!(list.find("free\u{00A0}crypto"), vec!["free crypto"]);
        assert_eq!(
            list.mask("get free\u{00A0}\u{00A0}crypto", '#').0,
            "get ############"
        );
    }

    #[test]
    fn whole_words_in_spaced_scripts_only() {
        let whole = WordList::new(["heck", "坏蛋"], true).unwrap();
        assert_eq!(whole.mask("heckler", '*'), ("heckler".into(), 0));
        assert_eq!(whole.mask("oh heck!", '*'), ("oh ****!".into(), 1));
        assert_eq!(
            whole.mask("你是坏蛋吗", '*').1,
            1,
            "no spaces between Chinese words"
        );
        let inside = WordList::new(["heck"], false).unwrap();
        assert_eq!(inside.mask("heckler", '*').0, "****ler");
    }
}

//! Sizes on the command line: `512`, `4K`, `4KiB`, `1MB`, `2G`, as util-linux accepts them.

/// Parses a size in bytes. `K`, `M`, `G`, `T`, `P`, `E` (optionally followed by `iB`) are
/// powers of 1024; the same letters followed by `B` are powers of 1000.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, radix, rest) = split_number(text);
    if number.is_empty() {
        return Err(format!(
            "invalid size '{text}': expected a number of bytes, optionally with a suffix such as 4K, 1MiB or 2G"
        ));
    }
    let (fraction, suffix) = match radix {
        10 => split_fraction(rest),
        _ => (String::new(), rest),
    };

    let value = u64::from_str_radix(number, radix)
        .map_err(|_| format!("invalid size '{text}': the number is too large"))?;
    let multiplier = suffix_multiplier(suffix).ok_or_else(|| {
        format!("invalid size '{text}': unknown suffix '{suffix}' (use K, M, G, T, P or E, alone or with iB or B)")
    })?;
    let too_large = || format!("invalid size '{text}': larger than 2^64 bytes");
    let whole = value.checked_mul(multiplier).ok_or_else(too_large)?;

    // util-linux reads `1.M` as 1 MiB, so the digits after the point may be missing.
    if rest.starts_with('.') && suffix.is_empty() {
        return Err(format!(
            "invalid size '{text}': a fraction needs a suffix, as in 1.5M"
        ));
    }
    whole
        .checked_add(fraction_of(&fraction, multiplier))
        .ok_or_else(too_large)
}

/// Splits `text` into its leading digits, their radix and the rest. As in util-linux (and
/// C's `strtoumax` with base 0), `0x` starts a hexadecimal number and a leading `0` an
/// octal one: `-o 010` is 8 bytes there.
fn split_number(text: &str) -> (&str, u32, &str) {
    let (digits, radix) =
        if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
            (hex, 16)
        } else if text.len() > 1
            && text.starts_with('0')
            && text[1..].starts_with(|c: char| c.is_ascii_digit())
        {
            (&text[1..], 8)
        } else {
            (text, 10)
        };
    let end = digits
        .find(|c: char| !c.is_digit(radix))
        .unwrap_or(digits.len());
    let (number, rest) = digits.split_at(end);
    (number, radix, rest)
}

/// Splits the decimal fraction (`.5` of `1.5M`) off `rest` and returns its digits and the
/// suffix. As util-linux does, further points are skipped while the digits read so far are
/// all zeros, so `1..M` and `1.0.0M` are 1 MiB and `1.0.5M` is 1.05 MiB.
fn split_fraction(mut rest: &str) -> (String, &str) {
    let mut fraction = String::new();
    while let Some(after) = rest.strip_prefix('.') {
        if fraction.chars().any(|digit| digit != '0') {
            break;
        }
        let end = after
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(after.len());
        fraction.push_str(&after[..end]);
        rest = &after[end..];
    }
    (fraction, rest)
}

/// Returns `0.DIGITS` times `multiplier`, rounded down to whole bytes.
fn fraction_of(digits: &str, multiplier: u64) -> u64 {
    // Digits past the 18th change the result by at most about one byte, even for E.
    let digits = &digits[..digits.len().min(18)];
    let numerator: u128 = digits.parse().unwrap_or(0);
    let denominator = 10u128.pow(digits.len() as u32);
    // Below the multiplier, so it fits in u64.
    (u128::from(multiplier) * numerator / denominator) as u64
}

fn suffix_multiplier(suffix: &str) -> Option<u64> {
    if suffix.is_empty() {
        return Some(1);
    }
    let mut characters = suffix.chars();
    let letter = characters.next()?.to_ascii_uppercase();
    let exponent = "KMGTPE".find(letter)? as u32 + 1;

    match characters.as_str() {
        "" | "iB" | "ib" => 1024u64.checked_pow(exponent),
        "B" | "b" => 1000u64.checked_pow(exponent),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_accepts_suffixes() {
        let cases = [
            ("512", 512),
            ("4K", 4096),
            ("4k", 4096),
            ("1MiB", 1 << 20),
            ("2G", 2 << 30),
            ("1MB", 1_000_000),
            ("3T", 3 << 40),
            ("0x100000", 1 << 20),
            ("0X10K", 16 << 10),
            ("1.5M", 3 << 19),
            ("1.5G", 3 << 29),
            ("0.5KiB", 512),
            ("2.25MB", 2_250_000),
            ("1.M", 1 << 20),
            ("1..M", 1 << 20),
            ("1.0.0M", 1 << 20),
            ("1.05K", 1075),
            ("010", 8),
            ("0100", 64),
            ("0", 0),
            ("0K", 0),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_size(text), Ok(expected), "size {text}");
        }
    }

    #[test]
    fn size_rejects_malformed_text() {
        for text in [
            "",
            "K",
            "-1",
            "1.5",
            "1.",
            "1.5B",
            "0x1.8M",
            "12Q",
            "4KiBB",
            "99999999999999999999",
            "16E",
            "0x",
            "0xG",
            "08",
            "1.5.5M",
            "1.0.",
        ] {
            assert!(parse_size(text).is_err(), "size {text}");
        }
    }
}

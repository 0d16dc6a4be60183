//! Sizes on the command line: `512`, `4K`, `4KiB`, `1MB`, `2G`, as util-linux accepts them.

/// Parses a size in bytes. `K`, `M`, `G`, `T`, `P`, `E` (optionally followed by `iB`) are
/// powers of 1024; the same letters followed by `B` are powers of 1000.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    // A `0x` prefix takes a hexadecimal number, as util-linux's losetup accepts it.
    let (digits, radix) = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => (hex, 16),
        None => (text, 10),
    };
    let digits_end = digits
        .find(|c: char| !c.is_digit(radix))
        .unwrap_or(digits.len());
    let (number, rest) = digits.split_at(digits_end);
    if number.is_empty() {
        return Err(format!(
            "invalid size '{text}': expected a number of bytes, optionally with a suffix such as 4K, 1MiB or 2G"
        ));
    }
    // A decimal fraction such as 1.5M, as util-linux accepts it.
    let (fraction, suffix) = match rest.strip_prefix('.') {
        Some(after) if radix == 10 => {
            let end = after
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(after.len());
            after.split_at(end)
        }
        _ => ("", rest),
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
        .checked_add(fraction_of(fraction, multiplier))
        .ok_or_else(too_large)
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
        ] {
            assert!(parse_size(text).is_err(), "size {text}");
        }
    }
}

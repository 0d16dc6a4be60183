//! CRC-32 as GPT uses it: the IEEE 802.3 polynomial, bit-reflected, with an initial value
//! and a final XOR of all ones. A 256-entry table is built at compile time.

/// The polynomial 0x04C11DB7 with its bits reversed, for the reflected algorithm.
const POLYNOMIAL: u32 = 0xEDB8_8320;

/// CRC of every one-byte value, so that the main loop handles a byte per step.
const TABLE: [u32; 256] = build_table();

const fn build_table() -> [u32; 256] {
    let mut table = [0; 256];
    let mut index = 0;
    while index < 256 {
        let mut value = index as u32;
        let mut bit = 0;
        while bit < 8 {
            value = if value & 1 == 1 {
                (value >> 1) ^ POLYNOMIAL
            } else {
                value >> 1
            };
            bit += 1;
        }
        table[index] = value;
        index += 1;
    }
    table
}

/// Computes the CRC-32 of `bytes`.
pub(super) fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        let index = (crc ^ u32::from(byte)) & 0xFF;
        crc = TABLE[index as usize] ^ (crc >> 8);
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::crc32;

    #[test]
    fn crc32_matches_check_value() {
        // The standard check input for CRC-32/ISO-HDLC, the variant Ethernet, zlib and GPT use.
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn crc32_of_empty_input_is_zero() {
        assert_eq!(crc32(&[]), 0);
    }

    #[test]
    fn crc32_of_zero_block_matches_zlib() {
        // zlib.crc32(bytes(128)) in Python 3.
        assert_eq!(crc32(&[0; 128]), 0xC2A8_FA9D);
    }
}

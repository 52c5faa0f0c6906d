//! The SMART / Health Information log page (Get Log Page, LID 02h, 512 bytes; NVMe base
//! specification, "SMART / Health Information"): its layout, decoding, and building one (for
//! the emulated controller).

use nvmed_proto::admin::SmartLog;

/// Size of the log page.
pub const LEN: usize = 512;

/// Byte offsets in the page (little-endian).
mod off {
    pub const CRITICAL_WARNING: usize = 0;
    pub const TEMPERATURE: usize = 1; // u16, kelvin
    pub const AVAILABLE_SPARE: usize = 3;
    pub const SPARE_THRESHOLD: usize = 4;
    pub const PERCENTAGE_USED: usize = 5;
    // The 128-bit counters.
    pub const DATA_UNITS_READ: usize = 32;
    pub const DATA_UNITS_WRITTEN: usize = 48;
    pub const HOST_READS: usize = 64;
    pub const HOST_WRITES: usize = 80;
    pub const BUSY_TIME: usize = 96;
    pub const POWER_CYCLES: usize = 112;
    pub const POWER_ON_HOURS: usize = 128;
    pub const UNSAFE_SHUTDOWNS: usize = 144;
    pub const MEDIA_ERRORS: usize = 160;
    pub const ERROR_LOG_ENTRIES: usize = 176;
}

fn u128_at(page: &[u8], at: usize) -> u64 {
    let v = u128::from_le_bytes(page[at..at + 16].try_into().expect("16 bytes"));
    u64::try_from(v).unwrap_or(u64::MAX)
}

fn put_u128(page: &mut [u8], at: usize, v: u64) {
    page[at..at + 16].copy_from_slice(&u128::from(v).to_le_bytes());
}

/// Decodes a page of at least [`LEN`] bytes (shorter ones are zero-extended).
pub fn decode(bytes: &[u8]) -> SmartLog {
    let mut page = [0u8; LEN];
    let n = bytes.len().min(LEN);
    page[..n].copy_from_slice(&bytes[..n]);
    let kelvin = u16::from_le_bytes([page[off::TEMPERATURE], page[off::TEMPERATURE + 1]]);
    SmartLog {
        critical_warning: page[off::CRITICAL_WARNING],
        temperature_kelvin: kelvin,
        temperature_celsius: i32::from(kelvin) - 273,
        available_spare: page[off::AVAILABLE_SPARE],
        available_spare_threshold: page[off::SPARE_THRESHOLD],
        percentage_used: page[off::PERCENTAGE_USED],
        data_units_read: u128_at(&page, off::DATA_UNITS_READ),
        data_units_written: u128_at(&page, off::DATA_UNITS_WRITTEN),
        host_read_commands: u128_at(&page, off::HOST_READS),
        host_write_commands: u128_at(&page, off::HOST_WRITES),
        controller_busy_minutes: u128_at(&page, off::BUSY_TIME),
        power_cycles: u128_at(&page, off::POWER_CYCLES),
        power_on_hours: u128_at(&page, off::POWER_ON_HOURS),
        unsafe_shutdowns: u128_at(&page, off::UNSAFE_SHUTDOWNS),
        media_errors: u128_at(&page, off::MEDIA_ERRORS),
        error_log_entries: u128_at(&page, off::ERROR_LOG_ENTRIES),
    }
}

/// Builds the page for `log` (its Celsius field is ignored: the page holds kelvin).
pub fn encode(log: &SmartLog) -> [u8; LEN] {
    let mut page = [0u8; LEN];
    page[off::CRITICAL_WARNING] = log.critical_warning;
    page[off::TEMPERATURE..off::TEMPERATURE + 2].copy_from_slice(&log.temperature_kelvin.to_le_bytes());
    page[off::AVAILABLE_SPARE] = log.available_spare;
    page[off::SPARE_THRESHOLD] = log.available_spare_threshold;
    page[off::PERCENTAGE_USED] = log.percentage_used;
    for (at, v) in [
        (off::DATA_UNITS_READ, log.data_units_read),
        (off::DATA_UNITS_WRITTEN, log.data_units_written),
        (off::HOST_READS, log.host_read_commands),
        (off::HOST_WRITES, log.host_write_commands),
        (off::BUSY_TIME, log.controller_busy_minutes),
        (off::POWER_CYCLES, log.power_cycles),
        (off::POWER_ON_HOURS, log.power_on_hours),
        (off::UNSAFE_SHUTDOWNS, log.unsafe_shutdowns),
        (off::MEDIA_ERRORS, log.media_errors),
        (off::ERROR_LOG_ENTRIES, log.error_log_entries),
    ] {
        put_u128(&mut page, at, v);
    }
    page
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_page_laid_out_by_hand() {
        let mut page = [0u8; LEN];
        page[0] = 0b100;
        page[1..3].copy_from_slice(&318u16.to_le_bytes());
        page[3] = 97;
        page[4] = 10;
        page[5] = 3;
        page[32] = 5; // data units read
        page[48..50].copy_from_slice(&0x0102u16.to_le_bytes());
        page[64] = 7;
        page[80] = 8;
        page[112] = 2;
        page[128] = 9;
        page[144] = 1;
        page[160] = 4;
        page[176] = 6;
        let s = decode(&page);
        assert_eq!(s.critical_warning, 4);
        assert_eq!((s.temperature_kelvin, s.temperature_celsius), (318, 45));
        assert_eq!((s.available_spare, s.available_spare_threshold, s.percentage_used), (97, 10, 3));
        assert_eq!((s.data_units_read, s.data_units_written), (5, 0x102));
        assert_eq!((s.host_read_commands, s.host_write_commands), (7, 8));
        assert_eq!((s.power_cycles, s.power_on_hours, s.unsafe_shutdowns), (2, 9, 1));
        assert_eq!((s.media_errors, s.error_log_entries), (4, 6));
        // A 128-bit counter beyond 64 bits saturates.
        page[32 + 8] = 1;
        assert_eq!(decode(&page).data_units_read, u64::MAX);
        assert_eq!(decode(&encode(&s)), s);
    }
}

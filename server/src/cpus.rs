//! CPU lists on command lines (`nvmed --cpus`, ringbench's `--broker-cpus` and `--job-cpus`).

/// CPU numbers, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuList(pub Vec<usize>);

/// Parses `0`, `0,2`, `2-5` or `0,4-6` (CPU numbers below 1024).
pub fn parse_cpu_list(s: &str) -> Result<CpuList, String> {
    let mut cpus = Vec::new();
    for part in s.split(',').map(str::trim) {
        let num = |t: &str| t.trim().parse::<usize>().map_err(|_| format!("bad CPU number {t:?} in {s:?}"));
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(format!("bad CPU range {part:?}"));
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(num(part)?),
        }
    }
    if cpus.is_empty() || cpus.iter().any(|&c| c >= 1024) {
        return Err(format!("bad CPU list {s:?}"));
    }
    Ok(CpuList(cpus))
}

#[cfg(test)]
mod tests {
    use super::{parse_cpu_list, CpuList};

    #[test]
    fn cpu_lists_parse_and_bad_ones_are_refused() {
        assert_eq!(parse_cpu_list("1"), Ok(CpuList(vec![1])));
        assert_eq!(parse_cpu_list("0, 2-4"), Ok(CpuList(vec![0, 2, 3, 4])));
        for bad in ["", "a", "3-1", "1,", "2000"] {
            assert!(parse_cpu_list(bad).is_err(), "{bad:?}");
        }
    }
}

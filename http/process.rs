//! This process's CPU time and resident memory as Prometheus metrics, read from /proc at every
//! scrape (the saturation half of the golden signals for each binary).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// Registers as `process_cpu_seconds_total` and `process_resident_memory_bytes` under the
/// registry's prefix and labels.
#[derive(Debug, Default)]
pub struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some((cpu_seconds, resident_bytes)) = process_usage() else { return Ok(()) };
        let cpu = ConstCounter::new(cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "CPU time (user and system) of this process",
            None,
            cpu.metric_type(),
        )?)?;
        let memory = ConstGauge::new(resident_bytes as i64);
        memory.encode(encoder.encode_descriptor(
            "process_resident_memory_bytes",
            "Resident memory of this process",
            None,
            memory.metric_type(),
        )?)?;
        Ok(())
    }
}

/// This process's CPU seconds (user + system) and resident bytes, from /proc; `None` where
/// there is no /proc.
pub fn process_usage() -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start at state (field 3).
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let resident_pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // Linux reports in clock ticks of 1/100 s and pages of 4 KiB on every platform we run on.
    Some((ticks / 100.0, resident_pages * 4096))
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    #[test]
    fn reads_this_process_usage() {
        let (cpu, resident) = process_usage().expect("/proc is readable");
        assert!(cpu >= 0.0);
        assert!(resident > 1 << 20, "a running test holds more than 1 MiB");
    }

    #[test]
    fn encodes_under_the_registry_prefix() {
        let mut registry = Registry::with_prefix("demo");
        registry.register_collector(Box::new(ProcessCollector));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("# TYPE demo_process_cpu_seconds counter"), "{text}");
        assert!(text.contains("demo_process_cpu_seconds_total "), "{text}");
        let resident = text.lines().find_map(|l| l.strip_prefix("demo_process_resident_memory_bytes ")).unwrap();
        assert!(resident.parse::<u64>().unwrap() > 1 << 20, "{text}");
    }
}

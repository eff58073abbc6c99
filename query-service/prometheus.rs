//! Reading Prometheus text as the live panel scrapes it: samples, sums over labels, and a
//! histogram quantile over the observations between two scrapes.

/// One sample of Prometheus text: the metric name, its labels and its value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// Parses the sample lines of Prometheus or OpenMetrics text (comments and `# EOF` skipped;
/// label values unescaped for `\"`, `\\` and `\n`). Lines that do not parse are skipped.
pub fn parse_samples(text: &str) -> Vec<Sample> {
    text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_owned();
    let mut labels = Vec::new();
    let mut rest = &line[name_end..];
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices().peekable();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            if c == '}' {
                end = Some(i);
                break;
            }
            if c == ',' || c == ' ' {
                continue;
            }
            let key_start = i;
            let eq = body[key_start..].find('=')? + key_start;
            let key = body[key_start..eq].to_owned();
            while chars.peek().is_some_and(|(j, _)| *j <= eq) {
                chars.next();
            }
            if chars.next()?.1 != '"' {
                return None;
            }
            let mut value = String::new();
            loop {
                match chars.next()?.1 {
                    '"' => break,
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    other => value.push(other),
                }
            }
            labels.push((key, value));
        }
        rest = &body[end? + 1..];
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample { name, labels, value })
}

/// The sum of the samples named `name` whose labels pass `keep`.
pub fn sum(samples: &[Sample], name: &str, keep: impl Fn(&Sample) -> bool) -> f64 {
    // `+ 0.0`: the sum of nothing is -0.0, which JSON and the UI would show as "-0".
    samples.iter().filter(|s| s.name == name && keep(s)).map(|s| s.value).sum::<f64>() + 0.0
}

/// The `q` quantile of a histogram's observations between two scrapes (all label sets
/// merged), interpolated inside its bucket as Prometheus' `histogram_quantile` does; `None`
/// without observations in between.
pub fn quantile_between(before: &[Sample], after: &[Sample], histogram: &str, q: f64) -> Option<f64> {
    let bucket = format!("{histogram}_bucket");
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for sample in after.iter().filter(|s| s.name == bucket) {
        let le: f64 = match sample.label("le")? {
            "+Inf" => f64::INFINITY,
            le => le.parse().ok()?,
        };
        let earlier: f64 =
            before.iter().filter(|b| b.name == bucket && b.labels == sample.labels).map(|b| b.value).sum();
        match buckets.iter_mut().find(|(l, _)| *l == le) {
            Some((_, count)) => *count += sample.value - earlier,
            None => buckets.push((le, sample.value - earlier)),
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in &buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let width = count - lower.1;
            let inside = if width > 0.0 { (rank - lower.1) / width } else { 1.0 };
            return Some(lower.0 + (le - lower.0) * inside);
        }
        lower = (le, count);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prometheus_text() {
        let text = "# TYPE a counter\na_total 12345\nb{job=\"view_counts\",le=\"0.5\"} 3\n\
                    c{x=\"quo\\\"te, comma\"} 1.5e3\n# EOF\n";
        let samples = parse_samples(text);
        assert_eq!(samples.len(), 3);
        assert_eq!(samples[0], Sample { name: "a_total".into(), labels: vec![], value: 12_345.0 });
        assert_eq!(samples[1].label("job"), Some("view_counts"));
        assert_eq!(samples[1].label("le"), Some("0.5"));
        assert_eq!(samples[2].label("x"), Some("quo\"te, comma"));
        assert_eq!(samples[2].value, 1500.0);
        assert_eq!(sum(&samples, "a_total", |_| true), 12_345.0);
        assert!(sum(&samples, "absent", |_| true).is_sign_positive(), "nothing sums to +0, not -0");
    }

    #[test]
    fn histogram_quantiles_use_the_observations_in_between() {
        let scrape = |counts: [f64; 4]| {
            let les = ["0.1", "0.2", "0.4", "+Inf"];
            let text: String = les
                .iter()
                .zip(counts)
                .map(|(le, c)| format!("h_bucket{{endpoint=\"/x\",le=\"{le}\"}} {c}\n"))
                .collect();
            parse_samples(&text)
        };
        let before = scrape([10.0, 10.0, 10.0, 10.0]);
        // 100 new observations: 50 at most 0.1, 40 in (0.1, 0.2], 10 in (0.2, 0.4].
        let after = scrape([60.0, 100.0, 110.0, 110.0]);
        assert_eq!(quantile_between(&before, &after, "h", 0.5), Some(0.1));
        let p90 = quantile_between(&before, &after, "h", 0.9).unwrap();
        assert!((p90 - 0.2).abs() < 1e-9, "{p90}");
        let p99 = quantile_between(&before, &after, "h", 0.99).unwrap();
        assert!((p99 - 0.38).abs() < 1e-9, "{p99}");
        assert_eq!(quantile_between(&after, &after, "h", 0.5), None, "nothing observed in between");
    }
}

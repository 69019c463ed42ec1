//! Prices and exact integer cost: decimal price and budget strings parsed into picodollars
//! (1e-12 USD), the cost of a [`Usage`] under a [`Price`], and formatting back to USD.
//!
//! Why picodollars: a price in "USD per million tokens" with up to 6 fractional digits is an
//! exact integer number of picodollars per token ($1/M = 1e-6 $/token = 1_000_000 pUSD/token,
//! $0.0375/M = 37_500 pUSD/token), so every cost is an integer product and budgets never drift.
//!
//! Why strings: prices and budgets are decimal *strings* in the configuration ("0.075", not
//! 0.075). A JSON number goes through an `f64` in most tooling, and `0.075` is not representable
//! in binary; summing millions of such costs drifts. The configuration layer refuses numbers and
//! tells the operator to quote them.

use crate::api::Usage;

/// Picodollars in one US dollar.
pub const PICO_PER_USD: u64 = 1_000_000_000_000;

/// Picodollars in one microdollar (the metrics unit).
pub const PICO_PER_MICRO_USD: u64 = 1_000_000;

/// The largest accepted price, in pUSD per token: $1,000,000 per million tokens. Anything above
/// is a typo (a missing decimal point), not a model.
pub const MAX_PRICE_PICO_PER_TOKEN: u64 = 1_000_000 * 1_000_000;

/// The largest accepted USD amount, in pUSD: $10,000,000. A u64 of picodollars holds about
/// $18.4M, so this keeps budgets well inside it.
pub const MAX_USD_PICO: u64 = 10_000_000 * PICO_PER_USD;

/// Parses a price in USD per million tokens ("2.50", "0.075", "15", "0.000001") into picodollars
/// per token. At most 6 fractional digits (the price is then an exact integer per token); no
/// sign, exponent, separators or whitespace; at most $1,000,000 per million tokens.
pub fn parse_usd_per_million(s: &str) -> Result<u64, String> {
    // USD/M × 1e12 pUSD/USD ÷ 1e6 tokens/M = USD/M × 1e6: the decimal scaled by 6 digits.
    let value = parse_decimal(s, 6)?;
    match u64::try_from(value) {
        Ok(v) if v <= MAX_PRICE_PICO_PER_TOKEN => Ok(v),
        _ => Err(format!(
            "{} is too large: at most 1000000 USD per million tokens",
            shown(s)
        )),
    }
}

/// Parses a USD amount ("25", "0.50", "1000000.000001") into picodollars. At most 12 fractional
/// digits; no sign, exponent, separators or whitespace; at most $10,000,000.
pub fn parse_usd(s: &str) -> Result<u64, String> {
    let value = parse_decimal(s, 12)?;
    match u64::try_from(value) {
        Ok(v) if v <= MAX_USD_PICO => Ok(v),
        _ => Err(format!("{} is too large: at most 10000000 USD", shown(s))),
    }
}

/// Formats picodollars as an exact USD decimal: trailing zeros trimmed, at least one fractional
/// digit ("0.0", "0.000375", "12.5", "3.0"). No rounding ever; [`parse_usd`] reads it back.
pub fn format_usd(pico: u128) -> String {
    let per = u128::from(PICO_PER_USD);
    let mut out = format!("{}.{:012}", pico / per, pico % per);
    while out.ends_with('0') && !out.ends_with(".0") {
        out.pop();
    }
    out
}

/// Picodollars to whole microdollars, rounded down (saturating at `u64::MAX`).
///
/// A sum of floors can be less than the floor of the sum (two 0.6 µUSD costs floor to 0 each but
/// sum to 1 µUSD): whoever accumulates microdollars must carry the picodollar remainders.
pub fn to_micro_usd(pico: u128) -> u64 {
    u64::try_from(pico / u128::from(PICO_PER_MICRO_USD)).unwrap_or(u64::MAX)
}

/// The billed cost of one request: its exact picodollars rounded half-up to a microdollar. The
/// ledger (`llm_cost_usd`) and the cost metrics both use it, so they add up to the same sum;
/// budgets keep the exact picodollars.
pub fn billed_micro_usd(pico: u128) -> u64 {
    let half = u128::from(PICO_PER_MICRO_USD / 2);
    to_micro_usd(pico.saturating_add(half))
}

/// Microdollars as a USD decimal string with six decimals (`"0.000123"`, `"12.500000"`).
pub fn format_micro_usd(micro: u64) -> String {
    format!("{}.{:06}", micro / 1_000_000, micro % 1_000_000)
}

/// A model's prices, in picodollars per token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Price {
    /// Uncached prompt tokens.
    pub input: u64,
    /// Output tokens (reasoning included).
    pub output: u64,
    /// Prompt tokens read from the provider's cache.
    pub cached_input: u64,
    /// Prompt tokens written to the provider's cache (Anthropic's cache creation).
    pub cache_write_input: u64,
}

impl Price {
    /// A price whose cache read and cache write prices default to the input price when not
    /// configured, i.e. cache tokens are charged as plain prompt tokens. That is exact for
    /// providers that do not price them apart, an overcharge where cache reads are discounted,
    /// and an undercharge where cache writes cost more (Anthropic: 1.25× input), so such models
    /// should configure both.
    pub const fn new(
        input: u64,
        output: u64,
        cached_input: Option<u64>,
        cache_write_input: Option<u64>,
    ) -> Price {
        Price {
            input,
            output,
            cached_input: match cached_input {
                Some(v) => v,
                None => input,
            },
            cache_write_input: match cache_write_input {
                Some(v) => v,
                None => input,
            },
        }
    }

    /// The exact cost of `usage`, in picodollars.
    ///
    /// `usage.input` includes cache reads and cache writes, so the uncached part is what is left
    /// after taking both out. If a provider reports more cache tokens than input tokens, the
    /// uncached part is 0 and the cache tokens are still charged as reported (the larger, safer
    /// reading). `usage.reasoning` is part of `usage.output` and is not charged again.
    ///
    /// With prices from [`parse_usd_per_million`] (< 2^40) each term is below 2^104 and the sum
    /// cannot overflow; the saturating arithmetic only makes hand-built extreme prices total.
    pub fn cost(&self, usage: &Usage) -> u128 {
        let uncached = usage
            .input
            .saturating_sub(usage.cached_input)
            .saturating_sub(usage.cache_write_input);
        mul(uncached, self.input)
            .saturating_add(mul(usage.cached_input, self.cached_input))
            .saturating_add(mul(usage.cache_write_input, self.cache_write_input))
            .saturating_add(mul(usage.output, self.output))
    }

    /// The most `input_tokens` prompt tokens and `output_tokens` output tokens can cost, whatever
    /// part of the prompt turns out to be cache reads or cache writes: every prompt token at the
    /// dearest of the three input prices. Used to reserve budget before the usage is known.
    pub fn cost_upper_bound(&self, input_tokens: u64, output_tokens: u64) -> u128 {
        let dearest_input = self
            .input
            .max(self.cached_input)
            .max(self.cache_write_input);
        mul(input_tokens, dearest_input).saturating_add(mul(output_tokens, self.output))
    }
}

/// u64 × u64 always fits in u128.
fn mul(tokens: u64, price: u64) -> u128 {
    u128::from(tokens).saturating_mul(u128::from(price))
}

/// Parses a plain decimal ("12", "0.075") into its value × 10^`scale`, allowing at most `scale`
/// fractional digits, so the result is exact. Overflow of u128 is reported as "too large".
fn parse_decimal(s: &str, scale: u32) -> Result<u128, String> {
    const EXAMPLE: &str = "expected a decimal number in a string, such as \"2.50\"";
    if s.is_empty() {
        return Err(format!("is empty: {EXAMPLE}"));
    }
    if s.starts_with('-') {
        return Err(format!("{} must not be negative", shown(s)));
    }
    if s.contains(['e', 'E']) {
        return Err(format!(
            "{} uses an exponent: write the number out, such as \"0.000001\"",
            shown(s)
        ));
    }
    let (whole, frac) = match s.split_once('.') {
        Some((whole, frac)) => (whole, Some(frac)),
        None => (s, None),
    };
    let all_digits = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(whole) || !frac.is_none_or(all_digits) {
        return Err(format!("{} is not a decimal number: {EXAMPLE}", shown(s)));
    }
    let frac = frac.unwrap_or("");
    let frac_len = u32::try_from(frac.len()).unwrap_or(u32::MAX);
    if frac_len > scale {
        return Err(format!(
            "{} has more than {scale} fractional digits",
            shown(s)
        ));
    }
    let too_large = || format!("{} is too large", shown(s));
    let mut value: u128 = 0;
    for digit in whole.bytes().chain(frac.bytes()) {
        value = value
            .checked_mul(10)
            .and_then(|v| v.checked_add(u128::from(digit - b'0')))
            .ok_or_else(too_large)?;
    }
    // Pad the missing fractional digits: "2.5" at scale 6 is 2_500_000.
    10u128
        .checked_pow(scale - frac_len)
        .and_then(|pad| value.checked_mul(pad))
        .ok_or_else(too_large)
}

/// The offending input for an error message, quoted and cut short so a pasted blob does not
/// flood the log.
fn shown(s: &str) -> String {
    const MAX_CHARS: usize = 32;
    let mut chars = s.chars();
    let head: String = chars.by_ref().take(MAX_CHARS).collect();
    if chars.next().is_some() {
        format!("{head:?}…")
    } else {
        format!("{head:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn usage(input: u64, cached: u64, cache_write: u64, output: u64, reasoning: u64) -> Usage {
        Usage {
            input,
            output,
            cached_input: cached,
            cache_write_input: cache_write,
            reasoning,
        }
    }

    fn gpt_4o_mini() -> Price {
        Price::new(
            parse_usd_per_million("0.15").unwrap(),
            parse_usd_per_million("0.60").unwrap(),
            Some(parse_usd_per_million("0.075").unwrap()),
            None,
        )
    }

    fn claude_sonnet() -> Price {
        Price::new(
            parse_usd_per_million("3").unwrap(),
            parse_usd_per_million("15").unwrap(),
            Some(parse_usd_per_million("0.30").unwrap()),
            Some(parse_usd_per_million("3.75").unwrap()),
        )
    }

    #[test]
    fn prices_are_exact_picodollars_per_token() {
        let cases: [(&str, u64); 10] = [
            ("1", 1_000_000),
            ("0.075", 75_000),
            ("0.0375", 37_500),
            ("2.50", 2_500_000),
            ("15", 15_000_000),
            ("0.000001", 1),
            ("0", 0),
            ("0.0", 0),
            ("007.5", 7_500_000),
            ("1000000", MAX_PRICE_PICO_PER_TOKEN),
        ];
        for (s, want) in cases {
            assert_eq!(parse_usd_per_million(s), Ok(want), "{s}");
        }
    }

    #[test]
    fn bad_prices_are_refused_with_a_reason() {
        let cases: [(&str, &str); 16] = [
            ("", "empty"),
            ("-1", "negative"),
            ("-0.5", "negative"),
            ("1e-6", "exponent"),
            ("1E3", "exponent"),
            ("0.0000001", "more than 6 fractional digits"),
            ("1000000.000001", "too large"),
            ("99999999999999999999999999999999999999999", "too large"),
            ("abc", "not a decimal number"),
            ("+1", "not a decimal number"),
            (" 1", "not a decimal number"),
            ("1,5", "not a decimal number"),
            ("1_000", "not a decimal number"),
            (".5", "not a decimal number"),
            ("5.", "not a decimal number"),
            ("1.2.3", "not a decimal number"),
        ];
        for (s, want) in cases {
            let err = parse_usd_per_million(s).unwrap_err();
            assert!(err.contains(want), "{s}: {err}");
        }
        assert!(parse_usd_per_million("NaN").is_err());
        assert!(parse_usd_per_million("١").is_err(), "non-ASCII digits");
    }

    #[test]
    fn long_inputs_are_cut_short_in_reasons() {
        let err = parse_usd_per_million(&"x".repeat(1000)).unwrap_err();
        assert!(err.len() < 150, "{err}");
        assert!(err.contains('…'), "{err}");
    }

    #[test]
    fn usd_amounts() {
        assert_eq!(parse_usd("25"), Ok(25 * PICO_PER_USD));
        assert_eq!(parse_usd("0.50"), Ok(PICO_PER_USD / 2));
        assert_eq!(
            parse_usd("1000000.000001"),
            Ok(1_000_000 * PICO_PER_USD + 1_000_000)
        );
        assert_eq!(parse_usd("0.000000000001"), Ok(1));
        assert_eq!(parse_usd("10000000"), Ok(MAX_USD_PICO));
        assert!(
            parse_usd("10000000.000000000001")
                .unwrap_err()
                .contains("too large")
        );
        assert!(parse_usd("18446744").unwrap_err().contains("too large"));
        assert!(
            parse_usd("0.0000000000001")
                .unwrap_err()
                .contains("more than 12 fractional digits")
        );
        assert!(parse_usd("-3").unwrap_err().contains("negative"));
    }

    #[test]
    fn gpt_4o_mini_cost_by_hand() {
        let price = gpt_4o_mini();
        assert_eq!(
            price,
            Price {
                input: 150_000,
                output: 600_000,
                cached_input: 75_000,
                cache_write_input: 150_000,
            }
        );
        // 6000 uncached × $0.15/M = $0.0009, 4000 cached × $0.075/M = $0.0003,
        // 2000 output × $0.60/M = $0.0012 (the 500 reasoning tokens are inside the 2000).
        let cost = price.cost(&usage(10_000, 4_000, 0, 2_000, 500));
        assert_eq!(cost, 2_400_000_000);
        assert_eq!(format_usd(cost), "0.0024");
        assert_eq!(to_micro_usd(cost), 2_400);
    }

    #[test]
    fn claude_sonnet_cost_by_hand() {
        let price = claude_sonnet();
        // Anthropic: input_tokens 100, cache_read 20_000, cache_creation 5_000, output 1_000.
        // $0.0003 + 20_000 × $0.30/M = $0.006 + 5_000 × $3.75/M = $0.01875 + $0.015 = $0.04005
        let cost = price.cost(&usage(25_100, 20_000, 5_000, 1_000, 0));
        assert_eq!(cost, 40_050_000_000);
        assert_eq!(format_usd(cost), "0.04005");
        assert_eq!(
            price.cost_upper_bound(25_100, 1_000),
            25_100 * 3_750_000 + 15_000_000_000
        );
    }

    #[test]
    fn unset_cache_prices_default_to_input() {
        let p = Price::new(7, 9, None, None);
        assert_eq!((p.cached_input, p.cache_write_input), (7, 7));
        let p = Price::new(7, 9, Some(1), Some(11));
        assert_eq!((p.cached_input, p.cache_write_input), (1, 11));
    }

    #[test]
    fn inconsistent_usage_still_charges_reported_cache_tokens() {
        let price = Price::new(10, 20, Some(1), Some(100));
        // More cache tokens than input tokens: uncached is 0, cache tokens charged as reported.
        assert_eq!(price.cost(&usage(5, 4, 4, 0, 0)), 4 + 400);
    }

    #[test]
    fn extreme_values_saturate_instead_of_overflowing() {
        let p = Price::new(u64::MAX, u64::MAX, None, None);
        let u = usage(u64::MAX, u64::MAX, u64::MAX, u64::MAX, u64::MAX);
        assert_eq!(p.cost(&u), u128::MAX);
        assert_eq!(p.cost_upper_bound(u64::MAX, u64::MAX), u128::MAX);
        assert_eq!(to_micro_usd(u128::MAX), u64::MAX);
        assert!(format_usd(u128::MAX).starts_with("340282366920938463463374607"));
    }

    #[test]
    fn formats_exact_usd() {
        let cases: [(u128, &str); 8] = [
            (0, "0.0"),
            (1, "0.000000000001"),
            (375_000_000, "0.000375"),
            (12_500_000_000_000, "12.5"),
            (3_000_000_000_000, "3.0"),
            (100_000_000_000_000, "100.0"),
            (1_000_000_000_001, "1.000000000001"),
            (10_500_000_000, "0.0105"),
        ];
        for (pico, want) in cases {
            assert_eq!(format_usd(pico), want, "{pico}");
        }
    }

    #[test]
    fn billed_cost_rounds_half_up_to_the_microdollar() {
        assert_eq!(billed_micro_usd(499_999), 0);
        assert_eq!(billed_micro_usd(500_000), 1);
        assert_eq!(billed_micro_usd(1_499_999), 1);
        assert_eq!(format_micro_usd(0), "0.000000");
        assert_eq!(format_micro_usd(123), "0.000123");
        assert_eq!(format_micro_usd(12_500_000), "12.500000");
    }

    #[test]
    fn micro_usd_floors() {
        assert_eq!(to_micro_usd(999_999), 0);
        assert_eq!(to_micro_usd(1_000_000), 1);
        assert_eq!(to_micro_usd(2_999_999), 2);
    }

    /// Named so that `cargo test --lib proptest` (the Makefile's fallback fuzzing) selects them.
    mod proptests {
        use super::*;

        fn price() -> impl Strategy<Value = Price> {
            (
                0..=MAX_PRICE_PICO_PER_TOKEN,
                0..=MAX_PRICE_PICO_PER_TOKEN,
                0..=MAX_PRICE_PICO_PER_TOKEN,
                0..=MAX_PRICE_PICO_PER_TOKEN,
            )
                .prop_map(|(input, output, cached_input, cache_write_input)| Price {
                    input,
                    output,
                    cached_input,
                    cache_write_input,
                })
        }

        proptest! {
            /// Whatever part of the prompt is cache reads or writes, the reservation covers it.
            #[test]
            fn upper_bound_covers_any_cache_split(
                p in price(),
                input in any::<u64>(),
                cached in any::<u64>(),
                cache_write in any::<u64>(),
                output in any::<u64>(),
                reasoning in any::<u64>(),
            ) {
                // Split `input` into cached, cache-write and uncached parts: `cached` and
                // `cache_write` are read as fractions of what is left.
                let part = |of: u64, frac: u64| {
                    (u128::from(of) * u128::from(frac) / u128::from(u64::MAX)) as u64
                };
                let cached = part(input, cached);
                let cache_write = part(input - cached, cache_write);
                let u = usage(input, cached, cache_write, output, reasoning.min(output));
                prop_assert!(p.cost_upper_bound(input, output) >= p.cost(&u));
            }

            /// With parsed prices the sum never saturates: it is the exact sum of the terms.
            #[test]
            fn cost_is_exact_below_saturation(
                p in price(),
                input in any::<u64>(),
                cached in any::<u64>(),
                cache_write in any::<u64>(),
                output in any::<u64>(),
            ) {
                let u = usage(input, cached, cache_write, output, 0);
                let uncached = input.saturating_sub(cached).saturating_sub(cache_write);
                let want = u128::from(uncached) * u128::from(p.input)
                    + u128::from(cached) * u128::from(p.cached_input)
                    + u128::from(cache_write) * u128::from(p.cache_write_input)
                    + u128::from(output) * u128::from(p.output);
                prop_assert_eq!(p.cost(&u), want);
            }

            #[test]
            fn format_parse_round_trip(pico in 0..=MAX_USD_PICO) {
                let s = format_usd(u128::from(pico));
                prop_assert_eq!(parse_usd(&s), Ok(pico), "{}", s);
            }

            #[test]
            fn price_string_round_trip(whole in 0u64..=999_999, frac in 0u64..=999_999) {
                let s = format!("{whole}.{frac:06}");
                prop_assert_eq!(parse_usd_per_million(&s), Ok(whole * 1_000_000 + frac));
            }

            #[test]
            fn arbitrary_strings_never_panic(s in ".{0,64}") {
                let _ = parse_usd_per_million(&s);
                let _ = parse_usd(&s);
            }

            #[test]
            fn numeric_looking_strings_never_panic(s in "[-+0-9.eE]{0,40}") {
                if let Ok(v) = parse_usd_per_million(&s) {
                    prop_assert!(v <= MAX_PRICE_PICO_PER_TOKEN);
                }
                if let Ok(v) = parse_usd(&s) {
                    prop_assert!(v <= MAX_USD_PICO);
                }
            }
        }
    }
}

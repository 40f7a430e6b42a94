//! Credit pricing: the price per credit falls with the size of the purchase (Halaxy's tiers),
//! GST included, everything in whole cents. A purchase qualifies for the cheapest tier whose
//! minimum its total at that tier's price reaches; purchases above $10,000 are refused.

use serde::Deserialize;

/// One price tier: purchases totalling at least `min_total_cents` (at this tier's price) pay
/// `cents_per_credit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct PriceTier {
    /// Lowest purchase total, in cents, for this tier.
    pub min_total_cents: i64,
    /// Price of one credit in this tier, in cents, GST included.
    pub cents_per_credit: i64,
}

/// Halaxy's published tiers: under $100 → 22c; $100–199.99 → 20c; $200–399.99 → 18c;
/// $400–$10,000 → 15c.
pub const DEFAULT_TIERS: [PriceTier; 4] = [
    PriceTier {
        min_total_cents: 0,
        cents_per_credit: 22,
    },
    PriceTier {
        min_total_cents: 10_000,
        cents_per_credit: 20,
    },
    PriceTier {
        min_total_cents: 20_000,
        cents_per_credit: 18,
    },
    PriceTier {
        min_total_cents: 40_000,
        cents_per_credit: 15,
    },
];

/// The largest purchase accepted, in cents ($10,000).
pub const MAX_PURCHASE_CENTS: i64 = 1_000_000;

/// A priced purchase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Price {
    /// Credits bought.
    pub credits: i64,
    /// Price per credit, cents.
    pub cents_per_credit: i64,
    /// Total, cents, GST included.
    pub total_cents: i64,
    /// The GST within the total (one eleventh, rounded to the nearest cent).
    pub gst_cents: i64,
}

/// Prices `credits` with `tiers`. `None` when the purchase is empty or above the maximum.
pub fn price(tiers: &[PriceTier], credits: i64) -> Option<Price> {
    if credits <= 0 {
        return None;
    }
    let mut by_price: Vec<PriceTier> = tiers.to_vec();
    by_price.sort_by_key(|tier| tier.cents_per_credit);
    let (tier, total_cents) = by_price.iter().find_map(|tier| {
        let total = credits.checked_mul(tier.cents_per_credit)?;
        (total >= tier.min_total_cents).then_some((*tier, total))
    })?;
    if total_cents > MAX_PURCHASE_CENTS {
        return None;
    }
    Some(Price {
        credits,
        cents_per_credit: tier.cents_per_credit,
        total_cents,
        gst_cents: (total_cents + 5) / 11,
    })
}

/// A pack in the catalogue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreditPack {
    /// Stable id, e.g. `pack-500`.
    pub id: String,
    /// Its price.
    pub price: Price,
}

/// The packs on offer, built from configured credit counts.
#[derive(Debug, Clone)]
pub struct Catalogue {
    packs: Vec<CreditPack>,
}

impl Catalogue {
    /// Builds the catalogue; every pack must be priceable.
    pub fn new(tiers: &[PriceTier], pack_credits: &[i64]) -> Result<Self, String> {
        let mut packs = Vec::new();
        for &credits in pack_credits {
            let price = price(tiers, credits).ok_or_else(|| {
                format!("a pack of {credits} credits cannot be priced (1 credit up to $10,000)")
            })?;
            packs.push(CreditPack {
                id: format!("pack-{credits}"),
                price,
            });
        }
        packs.sort_by_key(|pack| pack.price.credits);
        packs.dedup_by_key(|pack| pack.price.credits);
        if packs.is_empty() {
            return Err("the credit catalogue needs at least one pack".into());
        }
        Ok(Self { packs })
    }

    /// Every pack, smallest first.
    pub fn packs(&self) -> &[CreditPack] {
        &self.packs
    }

    /// A pack by id.
    pub fn find(&self, id: &str) -> Option<&CreditPack> {
        self.packs.iter().find(|pack| pack.id == id)
    }

    /// The smallest pack (bought at send time when no auto top-up pack is set).
    pub fn smallest(&self) -> &CreditPack {
        &self.packs[0]
    }
}

/// Default pack sizes: one in each default tier.
pub const DEFAULT_PACK_CREDITS: [i64; 4] = [100, 500, 1200, 3000];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_default_pack_lands_in_its_tier() {
        let catalogue = Catalogue::new(&DEFAULT_TIERS, &DEFAULT_PACK_CREDITS).unwrap();
        let prices: Vec<(i64, i64, i64)> = catalogue
            .packs()
            .iter()
            .map(|pack| {
                (
                    pack.price.credits,
                    pack.price.cents_per_credit,
                    pack.price.total_cents,
                )
            })
            .collect();
        assert_eq!(
            prices,
            vec![
                (100, 22, 2_200),
                (500, 20, 10_000),
                (1200, 18, 21_600),
                (3000, 15, 45_000)
            ]
        );
    }

    #[test]
    fn tier_boundaries_follow_the_purchase_total() {
        assert_eq!(price(&DEFAULT_TIERS, 454).unwrap().cents_per_credit, 22); // $99.88
        assert_eq!(price(&DEFAULT_TIERS, 500).unwrap().cents_per_credit, 20); // $100.00
        assert_eq!(price(&DEFAULT_TIERS, 999).unwrap().cents_per_credit, 20); // $199.80
        assert_eq!(price(&DEFAULT_TIERS, 1112).unwrap().cents_per_credit, 18); // $200.16
        assert_eq!(price(&DEFAULT_TIERS, 2667).unwrap().cents_per_credit, 15); // $400.05
        // 2666 credits at 15c is $399.90 (< $400), so it pays 18c: $479.88.
        assert_eq!(price(&DEFAULT_TIERS, 2666).unwrap().total_cents, 47_988);
    }

    #[test]
    fn gst_is_one_eleventh_of_the_total() {
        assert_eq!(price(&DEFAULT_TIERS, 100).unwrap().gst_cents, 200);
        assert_eq!(price(&DEFAULT_TIERS, 500).unwrap().gst_cents, 909);
    }

    #[test]
    fn empty_negative_and_oversized_purchases_have_no_price() {
        assert!(price(&DEFAULT_TIERS, 0).is_none());
        assert!(price(&DEFAULT_TIERS, -5).is_none());
        assert!(price(&DEFAULT_TIERS, 66_667).is_none()); // $10,000.05
        assert!(price(&DEFAULT_TIERS, 66_666).is_some());
        assert!(price(&DEFAULT_TIERS, i64::MAX).is_none());
    }
}

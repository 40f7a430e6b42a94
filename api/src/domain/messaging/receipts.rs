//! Delivery receipts pushed by providers (webhooks): verified before anything in them is believed.

use chrono::Utc;
use serde::Deserialize;

use super::MessagingService;
use super::outbox::{Jitter, OutboxPolicy, Outcome, next_step};
use crate::domain::GatewayError;
use crate::domain::types::{Direction, MessageStatus};
use crate::providers::DeliveryState;

impl MessagingService {
    /// A delivery receipt pushed by a provider. The signature (HMAC-SHA256 of
    /// `"<timestamp>.<body>"` with the account's secret) and the timestamp (within the replay
    /// window) are checked before anything in the body is believed.
    pub async fn receive_receipt(
        &self,
        account_id: &str,
        timestamp: Option<&str>,
        signature: Option<&str>,
        body: &[u8],
    ) -> Result<(), GatewayError> {
        use hmac::{Hmac, Mac};
        let refused = || {
            GatewayError::Unauthenticated(
                "the receipt's signature or timestamp is not valid".into(),
            )
        };
        let account = self
            .store
            .account_by_id(account_id)
            .await?
            .ok_or_else(refused)?;
        let sealed = account
            .webhook_secret_ciphertext
            .as_deref()
            .ok_or_else(refused)?;
        let secret = self
            .secrets
            .open(sealed, &format!("webhook/{}", account.id))
            .map_err(GatewayError::internal)?;
        let timestamp = timestamp.ok_or_else(refused)?;
        let sent_at: i64 = timestamp.parse().map_err(|_| refused())?;
        if (Utc::now().timestamp() - sent_at).unsigned_abs()
            > self.settings.webhook_tolerance.as_secs()
        {
            return Err(refused());
        }
        let signature = signature
            .and_then(|value| value.strip_prefix("sha256="))
            .ok_or_else(refused)?;
        let expected = decode_hex(signature).ok_or_else(refused)?;
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes())
            .map_err(GatewayError::internal)?;
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        mac.verify_slice(&expected).map_err(|_| refused())?;

        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Receipt {
            message_id: String,
            state: String,
            reason: Option<String>,
        }
        let receipt: Receipt = serde_json::from_slice(body).map_err(|_| {
            GatewayError::BadUserInput("the receipt is not the expected JSON".into())
        })?;
        let Some(message) = self.store.message_by_id(&receipt.message_id).await? else {
            return Ok(());
        };
        let ours = message.group_id == account.group_id
            && message.provider == account.provider
            && message.direction == Direction::Outbound;
        // Not ours, not sent yet (polling will see it), or already final: nothing to change.
        if !ours
            || !matches!(
                message.status,
                MessageStatus::Sent | MessageStatus::Delivered
            )
        {
            return Ok(());
        }
        let state = match receipt.state.as_str() {
            "DELIVERED" => DeliveryState::Delivered,
            "ACKNOWLEDGED" => DeliveryState::Acknowledged,
            "UNDELIVERABLE" => {
                DeliveryState::Failed(receipt.reason.unwrap_or_else(|| "undeliverable".into()))
            }
            _ => return Ok(()),
        };
        // The same rules as a polled answer: transitions only move forward, so duplicate and
        // out-of-order receipts change nothing.
        let outcome = Outcome::Delivery(state);
        let transition = next_step(
            &OutboxPolicy::from_settings(&self.settings),
            &message,
            &outcome,
            Utc::now(),
            Jitter::NONE,
        );
        self.apply(&message, &outcome, transition).await?;
        Ok(())
    }
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|index| u8::from_str_radix(text.get(index..index + 2)?, 16).ok())
        .collect()
}

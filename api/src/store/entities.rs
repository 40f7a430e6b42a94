//! sea-orm entities, one module per table. They never leave `store/`: queries convert them to
//! the domain's records, and they never derive GraphQL types.

pub mod groups {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "groups")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub created_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod users {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "users")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub group_id: String,
        pub subject: String,
        pub role: String,
        pub name: String,
        pub created_at: i64,
        pub updated_at: i64,
        pub hpii: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod provider_accounts {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "provider_accounts")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub group_id: String,
        pub provider: String,
        pub username: String,
        pub password_ciphertext: String,
        pub status: String,
        pub origin: String,
        pub practice_name: Option<String>,
        pub contact_email: Option<String>,
        pub created_by_user_id: String,
        pub created_at: i64,
        pub status_changed_at: i64,
        pub last_checked_at: Option<i64>,
        pub next_check_at: Option<i64>,
        pub check_failures: i32,
        pub webhook_secret_ciphertext: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod provider_links {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "provider_links")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub group_id: String,
        pub user_id: String,
        pub provider: String,
        pub account_id: String,
        pub created_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod audit_events {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "audit_events")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub group_id: String,
        pub actor_user_id: Option<String>,
        pub actor_subject: String,
        pub action: String,
        pub target: String,
        pub outcome: String,
        pub detail: Option<String>,
        pub request_id: String,
        pub created_at: i64,
        pub on_behalf_of_subject: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod payment_methods {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "payment_methods")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub group_id: String,
        pub token_ciphertext: String,
        pub brand: String,
        pub last4: String,
        pub exp_month: i32,
        pub exp_year: i32,
        pub updated_by_user_id: String,
        pub updated_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod spending_caps {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "spending_caps")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub group_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub scope: String,
        pub monthly_limit_cents: i64,
        pub updated_by_user_id: String,
        pub updated_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod wallets {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "wallets")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub user_id: String,
        pub group_id: String,
        pub balance: i64,
        pub auto_top_up_enabled: bool,
        pub threshold_credits: i64,
        pub top_up_pack_id: Option<String>,
        pub top_up_pending: bool,
        pub top_up_failures: i32,
        pub last_top_up_failure: Option<String>,
        pub last_top_up_failure_at: Option<i64>,
        pub auto_top_up_disabled_reason: Option<String>,
        pub updated_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod ledger_entries {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "ledger_entries")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub group_id: String,
        pub user_id: String,
        pub kind: String,
        pub credits: i64,
        pub balance_after: i64,
        pub reference: String,
        pub created_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod purchases {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "purchases")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub group_id: String,
        pub user_id: String,
        pub pack_id: String,
        pub credits: i64,
        pub amount_cents: i64,
        pub gst_cents: i64,
        pub status: String,
        pub origin: String,
        pub charge_id: Option<String>,
        pub failure_code: Option<String>,
        pub requested_by_user_id: Option<String>,
        pub requested_by_subject: Option<String>,
        pub idempotency_key: Option<String>,
        pub token_ciphertext: Option<String>,
        pub attempts: i32,
        pub next_attempt_at: Option<i64>,
        pub created_at: i64,
        pub completed_at: Option<i64>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod idempotency_keys {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "idempotency_keys")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub group_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub key: String,
        pub operation: String,
        pub fingerprint: String,
        pub state: String,
        pub response: Option<String>,
        pub created_at: i64,
        pub expires_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod patients {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "patients")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub group_id: String,
        pub owner_user_id: String,
        pub details_ciphertext: String,
        pub created_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod clinical_notes {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "clinical_notes")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub group_id: String,
        pub owner_user_id: String,
        pub patient_id: String,
        pub content_ciphertext: String,
        pub created_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod messages {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "messages")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub group_id: String,
        pub owner_user_id: String,
        pub direction: String,
        pub provider: String,
        pub status: String,
        pub counterpart_hpii: String,
        pub counterpart_name: String,
        pub note_id: Option<String>,
        pub payload_ciphertext: String,
        pub idempotency_key: Option<String>,
        pub provider_reference: Option<String>,
        pub failure_reason: Option<String>,
        pub credits_charged: i64,
        pub refunded: bool,
        pub ambiguous: bool,
        pub attempts: i32,
        pub next_attempt_at: Option<i64>,
        pub created_at: i64,
        pub sent_at: Option<i64>,
        pub delivered_at: Option<i64>,
        pub acknowledged_at: Option<i64>,
        pub updated_at: i64,
        pub addressed_hpii: Option<String>,
        pub flagged_undelivered_at: Option<i64>,
        pub flagged_unacknowledged_at: Option<i64>,
        pub expired_at: Option<i64>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod attempt_buckets {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "attempt_buckets")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub bucket: String,
        pub touched_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod attempt_slots {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "attempt_slots")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub bucket: String,
        pub created_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod sending_delegations {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "sending_delegations")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub group_id: String,
        pub practitioner_user_id: String,
        pub delegate_user_id: String,
        pub granted_at: i64,
        pub expires_at: Option<i64>,
        pub revoked_at: Option<i64>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

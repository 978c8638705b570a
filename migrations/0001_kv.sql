-- vcn schema version 1: the vault's key-value table.
--
-- It mirrors the storage trait (src/vault/store.rs) exactly: keys and values
-- are opaque bytes (the key layout is in src/vault/records.rs). Every value
-- that holds a card number is AES-256-GCM ciphertext and every key derived
-- from one is an HMAC, so this table holds no card number, CVV or key in
-- clear. Only features shared by PostgreSQL, CockroachDB and YugabyteDB.
CREATE TABLE IF NOT EXISTS vcn_kv (
    key   BYTEA PRIMARY KEY,
    value BYTEA NOT NULL
);

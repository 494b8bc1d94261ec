ALTER TABLE items ADD COLUMN priority integer NOT NULL DEFAULT 0;
CREATE TABLE orders (
    id bigserial PRIMARY KEY,
    item_id bigint NOT NULL REFERENCES items(id),
    quantity integer NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

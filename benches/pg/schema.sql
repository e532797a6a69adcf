-- The PostgreSQL baseline of benches/load.rs: shopkeep's data and its purchase, as a conventional
-- PostgreSQL application would write them. Loaded into a throwaway cluster (fsync = on,
-- synchronous_commit = on), then driven by pgbench with the scripts beside this file.
--
-- Money is integer minor units, as in shopkeep. Every write function runs as ONE transaction (the
-- statement that calls it) and mirrors what shopkeep's `apply` does for the same command: look up the
-- idempotency key (a repeat returns the stored outcome), lock the user's wallet row, decide, then write
-- the order + line, the posting(s), the entitlement and the idempotency row. Business rejections are
-- returned (and stored under the key), not raised, as shopkeep stores them.
--
-- Deliberately lean, so that the ratio shopkeep / PostgreSQL errs in PostgreSQL's favour: bigserial
-- keys (shopkeep: UUIDv7), no foreign keys (the functions check existence; a foreign key to the one hot
-- item row would turn every purchase into a multixact share lock), one posting per purchase (shopkeep
-- writes hold + debit and keeps a SHA-256 chain over its postings), system accounts not materialised.

CREATE TABLE users (
    user_id     text PRIMARY KEY,
    balance     bigint NOT NULL DEFAULT 0,
    held        bigint NOT NULL DEFAULT 0,
    ledger_seq  bigint NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CHECK (held >= 0 AND held <= balance)
);

CREATE TABLE items (
    item_id            text PRIMARY KEY,
    name               text NOT NULL,
    kind               text NOT NULL CHECK (kind IN ('game', 'skin', 'currency')),
    price              bigint NOT NULL CHECK (price > 0),
    active             boolean NOT NULL DEFAULT true,
    refund_window_days integer NOT NULL DEFAULT 14
);

CREATE TABLE orders (
    order_id       bigserial PRIMARY KEY,
    user_id        text NOT NULL,
    status         text NOT NULL,
    total          bigint NOT NULL,
    refunded_total bigint NOT NULL DEFAULT 0,
    created_at     timestamptz NOT NULL,
    completed_at   timestamptz,
    expires_at     timestamptz NOT NULL
);
-- A user's orders, newest first (shopkeep: USER_ORDERS), and the pending ones (USER_PENDING).
CREATE INDEX orders_by_user ON orders (user_id, order_id);
CREATE INDEX orders_pending ON orders (expires_at) WHERE status = 'PENDING';

CREATE TABLE order_lines (
    order_id          bigint NOT NULL,
    item_id           text NOT NULL,
    quantity          integer NOT NULL CHECK (quantity > 0),
    unit_price        bigint NOT NULL,
    refunded_quantity integer NOT NULL DEFAULT 0 CHECK (refunded_quantity <= quantity),
    PRIMARY KEY (order_id, item_id)
);

-- The ledger: one row per money movement between the wallet and a system account.
CREATE TABLE postings (
    posting_id     bigserial PRIMARY KEY,
    user_id        text NOT NULL,
    user_seq       bigint NOT NULL,
    kind           text NOT NULL,
    debit_account  text NOT NULL,
    credit_account text NOT NULL,
    amount         bigint NOT NULL CHECK (amount > 0),
    ref_type       text NOT NULL,
    ref_id         bigint NOT NULL,
    balance_after  bigint NOT NULL,
    held_after     bigint NOT NULL,
    at             timestamptz NOT NULL,
    UNIQUE (user_id, user_seq)
);

CREATE TABLE entitlements (
    user_id    text NOT NULL,
    item_id    text NOT NULL,
    granted    bigint NOT NULL DEFAULT 0,
    revoked    bigint NOT NULL DEFAULT 0,
    consumed   bigint NOT NULL DEFAULT 0,
    granted_at timestamptz NOT NULL,
    PRIMARY KEY (user_id, item_id),
    CHECK (granted >= revoked + consumed)
);

CREATE TABLE credits (
    credit_id    bigserial PRIMARY KEY,
    user_id      text NOT NULL,
    amount       bigint NOT NULL,
    external_ref text NOT NULL UNIQUE,
    created_at   timestamptz NOT NULL
);

CREATE TABLE refunds (
    refund_id  bigserial PRIMARY KEY,
    order_id   bigint NOT NULL,
    user_id    text NOT NULL,
    amount     bigint NOT NULL,
    created_at timestamptz NOT NULL
);

-- Stored outcomes, one per (scope, key); purged after expires_at (shopkeep: IDEMPOTENCY + _EXPIRY).
CREATE TABLE idempotency (
    scope      text NOT NULL,
    key        text NOT NULL,
    status     integer NOT NULL,
    response   jsonb NOT NULL,
    created_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE INDEX idempotency_expiry ON idempotency (expires_at);

-- Stores an outcome under (scope, key) and returns it.
CREATE FUNCTION remember(p_scope text, p_key text, p_status integer, p_response jsonb)
RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO idempotency (scope, key, status, response, created_at, expires_at)
    VALUES (p_scope, p_key, p_status, p_response, now(), now() + interval '7 days');
    RETURN p_response;
END $$;

-- Appends a posting to the user's ledger and moves the wallet; `u` is the locked row before the move.
CREATE FUNCTION post(u users, p_kind text, p_debit text, p_credit text, p_amount bigint,
                     p_ref_type text, p_ref_id bigint, p_dbalance bigint, p_dheld bigint)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    UPDATE users SET balance = balance + p_dbalance, held = held + p_dheld, ledger_seq = ledger_seq + 1
    WHERE user_id = u.user_id;
    INSERT INTO postings (user_id, user_seq, kind, debit_account, credit_account, amount, ref_type,
                          ref_id, balance_after, held_after, at)
    VALUES (u.user_id, u.ledger_seq + 1, p_kind, p_debit, p_credit, p_amount, p_ref_type, p_ref_id,
            u.balance + p_dbalance, u.held + p_dheld, now());
END $$;

-- Creates an order for p_qty × p_item: completed at once (`complete`, the one-step purchase: check
-- funds, debit, order + line, posting, entitlement, idempotency row) or pending (funds held).
CREATE FUNCTION place_order(p_user text, p_item text, p_qty integer, p_key text, p_complete boolean)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    stored jsonb;
    u users;
    it items;
    v_total bigint;
    v_order bigint;
    v_status text := CASE WHEN p_complete THEN 'COMPLETED' ELSE 'PENDING' END;
BEGIN
    SELECT response INTO stored FROM idempotency WHERE scope = p_user AND key = p_key;
    IF FOUND THEN
        RETURN stored;
    END IF;
    SELECT * INTO u FROM users WHERE user_id = p_user FOR UPDATE;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('status', 404, 'error', 'user_not_found');
    END IF;
    SELECT * INTO it FROM items WHERE item_id = p_item;
    IF NOT FOUND THEN
        RETURN remember(p_user, p_key, 404, jsonb_build_object('status', 404, 'error', 'item_not_found'));
    ELSIF NOT it.active THEN
        RETURN remember(p_user, p_key, 409, jsonb_build_object('status', 409, 'error', 'item_inactive'));
    END IF;
    v_total := it.price * p_qty;
    IF u.balance - u.held < v_total THEN
        RETURN remember(p_user, p_key, 409,
                        jsonb_build_object('status', 409, 'error', 'insufficient_funds'));
    END IF;
    INSERT INTO orders (user_id, status, total, created_at, completed_at, expires_at)
    VALUES (p_user, v_status, v_total, now(), CASE WHEN p_complete THEN now() END,
            now() + interval '15 minutes')
    RETURNING order_id INTO v_order;
    INSERT INTO order_lines (order_id, item_id, quantity, unit_price)
    VALUES (v_order, p_item, p_qty, it.price);
    IF p_complete THEN
        PERFORM post(u, 'debit', p_user, 'revenue', v_total, 'order', v_order, -v_total, 0);
        INSERT INTO entitlements (user_id, item_id, granted, granted_at)
        VALUES (p_user, p_item, p_qty, now())
        ON CONFLICT (user_id, item_id) DO UPDATE SET granted = entitlements.granted + EXCLUDED.granted;
    ELSE
        PERFORM post(u, 'hold', p_user, p_user || ':held', v_total, 'order', v_order, 0, v_total);
    END IF;
    RETURN remember(p_user, p_key, 201, jsonb_build_object(
        'status', 201, 'order_id', v_order, 'user_id', p_user, 'state', v_status, 'total', v_total,
        'lines', jsonb_build_array(jsonb_build_object(
            'item_id', p_item, 'quantity', p_qty, 'unit_price', it.price, 'refunded_quantity', 0))));
END $$;

-- The one-step purchase the targets compare: POST /v1/users/{id}/orders {"complete": true}.
CREATE FUNCTION purchase(p_user text, p_item text, p_qty integer, p_key text)
RETURNS jsonb LANGUAGE sql AS $$ SELECT place_order(p_user, p_item, p_qty, p_key, true) $$;

-- Step 1 of a two-step purchase; returns the order id (-1 if refused), for pgbench's \gset.
CREATE FUNCTION create_order(p_user text, p_item text, p_qty integer, p_key text)
RETURNS bigint LANGUAGE sql AS $$
    SELECT coalesce((place_order(p_user, p_item, p_qty, p_key, false) ->> 'order_id')::bigint, -1)
$$;

-- Step 2: debit the hold and grant the items.
CREATE FUNCTION complete_order(p_user text, p_order bigint, p_key text)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    stored jsonb;
    u users;
    o orders;
    l order_lines;
BEGIN
    SELECT response INTO stored FROM idempotency WHERE scope = p_user AND key = p_key;
    IF FOUND THEN
        RETURN stored;
    END IF;
    SELECT * INTO u FROM users WHERE user_id = p_user FOR UPDATE;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('status', 404, 'error', 'user_not_found');
    END IF;
    SELECT * INTO o FROM orders WHERE order_id = p_order AND user_id = p_user FOR UPDATE;
    IF NOT FOUND THEN
        RETURN remember(p_user, p_key, 404, jsonb_build_object('status', 404, 'error', 'order_not_found'));
    ELSIF o.status <> 'PENDING' THEN
        RETURN remember(p_user, p_key, 409, jsonb_build_object('status', 409, 'error', 'invalid_state'));
    END IF;
    PERFORM post(u, 'debit', p_user, 'revenue', o.total, 'order', p_order, -o.total, -o.total);
    FOR l IN SELECT * FROM order_lines WHERE order_id = p_order LOOP
        INSERT INTO entitlements (user_id, item_id, granted, granted_at)
        VALUES (p_user, l.item_id, l.quantity, now())
        ON CONFLICT (user_id, item_id) DO UPDATE SET granted = entitlements.granted + EXCLUDED.granted;
    END LOOP;
    UPDATE orders SET status = 'COMPLETED', completed_at = now() WHERE order_id = p_order;
    RETURN remember(p_user, p_key, 200, jsonb_build_object(
        'status', 200, 'order_id', p_order, 'user_id', p_user, 'state', 'COMPLETED', 'total', o.total));
END $$;

-- A direct credit with a unique external reference.
CREATE FUNCTION credit(p_user text, p_amount bigint, p_ref text, p_key text)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    stored jsonb;
    u users;
    v_credit bigint;
BEGIN
    SELECT response INTO stored FROM idempotency WHERE scope = p_user AND key = p_key;
    IF FOUND THEN
        RETURN stored;
    END IF;
    SELECT * INTO u FROM users WHERE user_id = p_user FOR UPDATE;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('status', 404, 'error', 'user_not_found');
    END IF;
    IF EXISTS (SELECT 1 FROM credits WHERE external_ref = p_ref) THEN
        RETURN remember(p_user, p_key, 409,
                        jsonb_build_object('status', 409, 'error', 'external_ref_conflict'));
    END IF;
    INSERT INTO credits (user_id, amount, external_ref, created_at)
    VALUES (p_user, p_amount, p_ref, now())
    RETURNING credit_id INTO v_credit;
    PERFORM post(u, 'credit', 'psp_clearing', p_user, p_amount, 'credit', v_credit, p_amount, 0);
    RETURN remember(p_user, p_key, 201, jsonb_build_object(
        'status', 201, 'credit_id', v_credit, 'user_id', p_user, 'amount', p_amount,
        'external_ref', p_ref, 'balance', u.balance + p_amount));
END $$;

-- Refunds the user's newest completed order whole (the load's "refund of an earlier order").
CREATE FUNCTION refund_latest(p_user text, p_key text)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    stored jsonb;
    u users;
    o orders;
    l order_lines;
    v_refund bigint;
    v_amount bigint := 0;
BEGIN
    SELECT response INTO stored FROM idempotency WHERE scope = p_user AND key = p_key;
    IF FOUND THEN
        RETURN stored;
    END IF;
    SELECT * INTO u FROM users WHERE user_id = p_user FOR UPDATE;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('status', 404, 'error', 'user_not_found');
    END IF;
    SELECT * INTO o FROM orders WHERE user_id = p_user AND status = 'COMPLETED'
    ORDER BY order_id DESC LIMIT 1 FOR UPDATE;
    IF NOT FOUND THEN
        RETURN remember(p_user, p_key, 409, jsonb_build_object('status', 409, 'error', 'invalid_state'));
    END IF;
    INSERT INTO refunds (order_id, user_id, amount, created_at)
    VALUES (o.order_id, p_user, o.total - o.refunded_total, now())
    RETURNING refund_id INTO v_refund;
    FOR l IN SELECT * FROM order_lines WHERE order_id = o.order_id FOR UPDATE LOOP
        UPDATE entitlements SET revoked = revoked + (l.quantity - l.refunded_quantity)
        WHERE user_id = p_user AND item_id = l.item_id;
        v_amount := v_amount + (l.quantity - l.refunded_quantity) * l.unit_price;
    END LOOP;
    UPDATE order_lines SET refunded_quantity = quantity WHERE order_id = o.order_id;
    UPDATE orders SET status = 'REFUNDED', refunded_total = total WHERE order_id = o.order_id;
    PERFORM post(u, 'refund', 'revenue', p_user, v_amount, 'refund', v_refund, v_amount, 0);
    RETURN remember(p_user, p_key, 201, jsonb_build_object(
        'status', 201, 'refund_id', v_refund, 'order_id', o.order_id, 'amount', v_amount,
        'balance', u.balance + v_amount));
END $$;

-- GET /v1/users/{id}/wallet.
CREATE FUNCTION wallet(p_user text)
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object('balance', balance, 'held', held, 'available', balance - held)
    FROM users WHERE user_id = p_user
$$;

-- The same seed as shopkeep's: one currency item at 0.01 and p_users users `bench-<i>`, each with a
-- direct credit of p_credit minor units.
CREATE FUNCTION seed(p_users integer, p_credit bigint)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    i integer;
BEGIN
    INSERT INTO items (item_id, name, kind, price) VALUES ('gems', 'Gems', 'currency', 1);
    FOR i IN 0 .. p_users - 1 LOOP
        INSERT INTO users (user_id) VALUES ('bench-' || i);
        PERFORM credit('bench-' || i, p_credit, 'bench-' || i, 'seed-' || i);
    END LOOP;
END $$;

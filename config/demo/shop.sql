-- Demo data for `sluice demo`: a small shop with the kinds of values Sluice
-- exists to protect. All of it is fake: names are invented, emails use
-- example.com, card numbers are the card networks' published test numbers,
-- SSNs are from ranges never issued, and the API keys are well-formed fakes.

CREATE ROLE shop_owner NOLOGIN;
CREATE ROLE shop_reader LOGIN PASSWORD 'reader-demo-password';
CREATE ROLE shop_writer LOGIN PASSWORD 'writer-demo-password';
CREATE DATABASE shop OWNER shop_owner;

\connect shop
SET ROLE shop_owner;

CREATE TABLE customers (
    id          serial PRIMARY KEY,
    name        text NOT NULL,
    email       text NOT NULL UNIQUE,
    phone       text,
    card_number text,
    ssn         text,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE orders (
    id          serial PRIMARY KEY,
    customer_id integer NOT NULL REFERENCES customers,
    total       numeric(10, 2) NOT NULL,
    status      text NOT NULL,
    created_at  timestamptz NOT NULL
);

CREATE TABLE api_keys (
    id          serial PRIMARY KEY,
    customer_id integer REFERENCES customers,
    service     text NOT NULL,
    secret      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

INSERT INTO customers (name, email, phone, card_number, ssn, created_at)
SELECT first || ' ' || last,
       lower(first) || '.' || lower(last) || n || '@example.com',
       '+1-415-555-01' || lpad((n % 100)::text, 2, '0'),
       (ARRAY['4111111111111111', '5555555555554444', '378282246310005',
              '6011111111111117', '4012888888881881'])[1 + n % 5],
       '9' || lpad((n * 37 % 100)::text, 2, '0') || '-' || lpad((n % 90 + 10)::text, 2, '0')
           || '-' || lpad((n * 7919 % 10000)::text, 4, '0'),
       timestamptz '2026-01-01 09:00:00+00' + n * interval '17 hours'
FROM generate_series(1, 60) AS n,
     LATERAL (SELECT (ARRAY['Ada', 'Grace', 'Alan', 'Edsger', 'Barbara', 'Donald',
                             'Frances', 'Ken', 'Radia', 'Leslie'])[1 + n % 10] AS first,
                     (ARRAY['Lovelace', 'Hopper', 'Turing', 'Dijkstra', 'Liskov', 'Knuth',
                             'Allen', 'Thompson', 'Perlman', 'Lamport', 'Ritchie'])[1 + n % 11] AS last) AS names;

INSERT INTO orders (customer_id, total, status, created_at)
SELECT 1 + (n * 13) % 60,
       round((5 + (n * 7919 % 50000) / 100.0)::numeric, 2),
       (ARRAY['paid', 'shipped', 'delivered', 'refunded'])[1 + n % 4],
       timestamptz '2026-02-01 00:00:00+00' + n * interval '3 hours'
FROM generate_series(1, 240) AS n;

INSERT INTO api_keys (customer_id, service, secret) VALUES
    (1, 'aws',    'AKIAIOSFODNN7EXAMPLE'),
    (2, 'github', 'ghp_' || repeat('x9Demo', 6)),
    (3, 'stripe', 'sk_live_' || repeat('DemoKey0', 3)),
    (4, 'slack',  'xoxb-1234567890-0987654321-' || repeat('demo', 6)),
    (NULL, 'internal', 'not-a-real-secret-but-treat-it-like-one');

GRANT SELECT ON ALL TABLES IN SCHEMA public TO shop_reader;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO shop_writer;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO shop_writer;

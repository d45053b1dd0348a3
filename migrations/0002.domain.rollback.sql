DROP VIEW active_entitlements;
DROP TABLE entitlements;
DROP TABLE disputes;
DROP TABLE refunds;
DROP TABLE invoices;
DROP TABLE subscriptions;
DROP TABLE payments;
DROP TABLE stripe_customers;

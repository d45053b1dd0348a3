DROP TABLE outbox;
DROP TABLE payment_requests;

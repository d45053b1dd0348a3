"""paybus ingress: verify Stripe webhooks and publish them, confirmed, to RabbitMQ."""

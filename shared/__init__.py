"""paybus shared package: configuration, message types, AMQP topology, database and CLI."""

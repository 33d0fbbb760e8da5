"""Delivery: MX routing, egress pools, shaping and the SMTP client that hands mail to receivers."""

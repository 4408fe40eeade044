"""The fleet: enrolment, certificates, revocation, key rotation and the agents' health (issue 11)."""

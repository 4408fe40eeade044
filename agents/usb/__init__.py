"""USB media guard: device rules, registered media and loans on My Number terminals."""

//! Glance's cache tables and the grants a driver's role needs, as SQL text
//! for each dialect: what `image-cache db init` and `db grants` print and
//! run, and what the backends' role checks compare against. Plain text, so
//! it is here whichever backends a build has.

/// The tables a cache driver's role may read and write, and nothing else.
pub const CACHE_TABLES: [&str; 2] = ["cached_images", "node_reference"];
/// The DML a cache driver's role needs on [`CACHE_TABLES`].
pub const TABLE_PRIVILEGES: [&str; 4] = ["SELECT", "INSERT", "UPDATE", "DELETE"];

/// On PostgreSQL.
pub mod postgres {
    use super::{CACHE_TABLES, TABLE_PRIVILEGES};

    /// Glance's two cache tables as its migrations create them on PostgreSQL
    /// (the 2024.1 `cache` migration, as SQLAlchemy emits it). Drivers never
    /// create them: Glance's `glance-manage db sync` does, or, for a database
    /// of the cache's own, `image-cache db init` runs this.
    pub const GLANCE_CACHE_SCHEMA: &str = "\
    CREATE TABLE IF NOT EXISTS node_reference (
        node_reference_id BIGSERIAL NOT NULL,
        node_reference_url VARCHAR(255) NOT NULL,
        PRIMARY KEY (node_reference_id),
        CONSTRAINT uq_node_reference_node_reference_url UNIQUE (node_reference_url)
    );
    CREATE TABLE IF NOT EXISTS cached_images (
        id BIGSERIAL NOT NULL,
        image_id VARCHAR(36) NOT NULL,
        last_accessed TIMESTAMP WITHOUT TIME ZONE NOT NULL,
        last_modified TIMESTAMP WITHOUT TIME ZONE NOT NULL,
        size BIGINT NOT NULL,
        hits INTEGER NOT NULL,
        checksum VARCHAR(32),
        node_reference_id BIGINT NOT NULL,
        PRIMARY KEY (id),
        FOREIGN KEY(node_reference_id) REFERENCES node_reference (node_reference_id),
        CONSTRAINT ix_cached_images_image_id_node_reference_id UNIQUE (image_id, node_reference_id)
    );
    ";

    /// Their sequences (`BIGSERIAL`), which inserts need `USAGE` on.
    pub const CACHE_SEQUENCES: [&str; 2] = [
        "cached_images_id_seq",
        "node_reference_node_reference_id_seq",
    ];

    /// An SQL identifier, quoted unless it is a plain lowercase name.
    fn ident(name: &str) -> String {
        let plain = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            && !name.starts_with(|c: char| c.is_ascii_digit());
        if plain {
            name.to_string()
        } else {
            format!("\"{}\"", name.replace('"', "\"\""))
        }
    }

    /// The SQL an administrator runs (in `database`, as the owner of Glance's
    /// tables) to give the cache's role (made with `CREATE ROLE ... LOGIN`, or
    /// an existing role with nothing else) exactly the privileges a driver
    /// needs: DML on the two cache tables, `USAGE` on their sequences. The last
    /// statement closes what PostgreSQL before 15 grants everyone.
    pub fn grant_statements(role: &str, database: &str) -> Vec<String> {
        let (role, database) = (ident(role), ident(database));
        vec![
            format!("GRANT CONNECT ON DATABASE {database} TO {role};"),
            format!("GRANT USAGE ON SCHEMA public TO {role};"),
            format!(
                "GRANT {} ON {} TO {role};",
                TABLE_PRIVILEGES.join(", "),
                CACHE_TABLES.join(", ")
            ),
            format!(
                "GRANT USAGE ON SEQUENCE {} TO {role};",
                CACHE_SEQUENCES.join(", ")
            ),
            "REVOKE CREATE ON SCHEMA public FROM PUBLIC;".to_string(),
        ]
    }
}

/// On MySQL and MariaDB.
pub mod mysql {
    use super::{CACHE_TABLES, TABLE_PRIVILEGES};

    /// Glance's two cache tables as its migrations create them on MySQL (the
    /// 2024.1 `cache` migration: InnoDB, utf8). Drivers never create them:
    /// `glance-manage db sync` does, or `image-cache db init` for a database of
    /// the cache's own.
    pub const GLANCE_CACHE_SCHEMA: [&str; 2] = [
        "CREATE TABLE IF NOT EXISTS node_reference (
        node_reference_id BIGINT NOT NULL AUTO_INCREMENT,
        node_reference_url VARCHAR(255) NOT NULL,
        PRIMARY KEY (node_reference_id),
        CONSTRAINT uq_node_reference_node_reference_url UNIQUE (node_reference_url)
    ) ENGINE=InnoDB CHARSET=utf8",
        "CREATE TABLE IF NOT EXISTS cached_images (
        id BIGINT NOT NULL AUTO_INCREMENT,
        image_id VARCHAR(36) NOT NULL,
        last_accessed DATETIME NOT NULL,
        last_modified DATETIME NOT NULL,
        size BIGINT NOT NULL,
        hits INTEGER NOT NULL,
        checksum VARCHAR(32),
        node_reference_id BIGINT NOT NULL,
        PRIMARY KEY (id),
        FOREIGN KEY(node_reference_id) REFERENCES node_reference (node_reference_id),
        CONSTRAINT ix_cached_images_image_id_node_reference_id UNIQUE (image_id, node_reference_id)
    ) ENGINE=InnoDB CHARSET=utf8",
    ];

    /// `name` as a MySQL identifier.
    fn ident(name: &str) -> String {
        format!("`{}`", name.replace('`', "``"))
    }

    /// `user` or `user@host` as a MySQL account (`'user'@'%'` by default).
    fn account(role: &str) -> String {
        let quote = |s: &str| format!("'{}'", s.replace('\'', "''"));
        match role.rsplit_once('@') {
            Some((user, host)) => format!("{}@{}", quote(user), quote(host)),
            None => format!("{}@'%'", quote(role)),
        }
    }

    /// The statements an administrator runs to give the cache's account
    /// (`role`, or `user@host`; made with `CREATE USER ... IDENTIFIED BY`)
    /// exactly what a driver needs: DML on the two cache tables of `database`.
    pub fn grant_statements(role: &str, database: &str) -> Vec<String> {
        let (who, database) = (account(role), ident(database));
        CACHE_TABLES
            .iter()
            .map(|table| {
                format!(
                    "GRANT {} ON {database}.{} TO {who};",
                    TABLE_PRIVILEGES.join(", "),
                    ident(table)
                )
            })
            .collect()
    }
}

//! AMD product lines (the chip generations whose roots verify a report).

/// AMD product lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Product {
    /// EPYC 7003.
    Milan,
    /// EPYC 9004.
    Genoa,
    /// EPYC 9005.
    Turin,
}

impl Product {
    /// Parses `milan`, `genoa`, `turin`.
    pub fn from_name(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "milan" => Some(Product::Milan),
            "genoa" => Some(Product::Genoa),
            "turin" => Some(Product::Turin),
            _ => None,
        }
    }

    /// Name for output.
    pub fn name(&self) -> &'static str {
        match self {
            Product::Milan => "Milan",
            Product::Genoa => "Genoa",
            Product::Turin => "Turin",
        }
    }
}

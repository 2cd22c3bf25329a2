#pragma once
// EXPECT that a call throws c10::Error and that its message says what it should.
#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include <initializer_list>
#include <string>

namespace statemamba::test {

// Expects f() to throw a c10::Error whose message contains every one of `parts`.
template <typename F>
void expect_error(F&& f, std::initializer_list<std::string> parts) {
  try {
    f();
    ADD_FAILURE() << "expected a c10::Error mentioning '" << *parts.begin() << "', but nothing was thrown";
  } catch (const c10::Error& e) {
    const std::string message = e.what_without_backtrace();
    for (const auto& part : parts)
      EXPECT_NE(message.find(part), std::string::npos) << "the message lacks '" << part << "':\n" << message;
  }
}

}  // namespace statemamba::test
